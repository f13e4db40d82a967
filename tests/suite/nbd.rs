//! The NBD fetcher against real servers: qemu-nbd (plain, TLS with a CA) and nbdkit (TLS with a
//! self-signed certificate like XenServer's, no structured replies, injected errors), plus a
//! proxy that cuts connections mid-transfer. Data fetched must equal the source byte for byte.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

/// A server process, killed when dropped.
struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(p: &Path) {
    let start = Instant::now();
    while UnixStream::connect(p).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "server socket {} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(cmd: &str, args: &[&str], sock: &Path) -> Server {
    let child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd} is installed (scripts/setup.sh): {e}"));
    let s = Server(child);
    wait_socket(sock);
    s
}

fn qemu_nbd(sock: &Path, image: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "-r",
        "-f",
        "raw",
        "-t",
        "-e",
        "16",
        "-x",
        "disk",
        "-k",
        s(sock),
    ];
    args.extend(extra);
    args.push(s(image));
    spawn("qemu-nbd", &args, sock)
}

fn nbdkit(sock: &Path, image: &Path, extra: &[&str], filters_and_params: &[&str]) -> Server {
    let mut args = vec!["-f", "-U", s(sock)];
    args.extend(extra);
    let (filters, params): (Vec<&str>, Vec<&str>) = filters_and_params
        .iter()
        .partition(|a| a.starts_with("--filter="));
    args.extend(filters);
    args.push("file");
    args.push(s(image));
    args.extend(params);
    spawn("nbdkit", &args, sock)
}

/// A self-signed certificate with only a subjectAltName, no basicConstraints: what xen-api's
/// gencert makes. Written as a GnuTLS/qemu credentials directory.
fn self_signed(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cnf = dir.join("req.cnf");
    std::fs::write(&cnf, format!("[req]\ndistinguished_name=dn\nx509_extensions=ext\nprompt=no\n[dn]\nCN={name}\n[ext]\nsubjectAltName=DNS:{name}\n")).unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-config",
        s(&cnf),
        "-keyout",
        s(&dir.join("server-key.pem")),
        "-out",
        s(&dir.join("server-cert.pem")),
    ]);
    std::fs::copy(dir.join("server-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    dir.join("server-cert.pem")
}

/// A CA and a server certificate it signed for `name`.
fn ca_signed(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = |f: &str| dir.join(f);
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=test CA",
        "-keyout",
        s(&p("ca-key.pem")),
        "-out",
        s(&p("ca-cert.pem")),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        s(&p("server-key.pem")),
        "-out",
        s(&p("server.csr")),
    ]);
    std::fs::write(
        p("ext.cnf"),
        format!("subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        s(&p("server.csr")),
        "-CA",
        s(&p("ca-cert.pem")),
        "-CAkey",
        s(&p("ca-key.pem")),
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        s(&p("ext.cnf")),
        "-out",
        s(&p("server-cert.pem")),
    ]);
    p("ca-cert.pem")
}

/// A 16 MiB disk: data, zeros and a hole-like tail.
fn disk(d: &Path, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0u8; 256 * BS];
    let mut rng = TestRng::new(seed);
    for b in 0..256 {
        if rng.below(3) != 0 && b < 200 {
            rng.fill(&mut data[b * BS..(b + 1) * BS]);
        }
    }
    let p = d.join(format!("disk{seed}.img"));
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

fn latest(repo: &Path, v: &str) -> Vec<u8> {
    let o = cbtfs(&["export", s(repo), &format!("{v}@latest"), "-"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

fn count_points(repo: &Path) -> usize {
    let j: serde_json::Value = serde_json::from_str(&ok(&["ls", s(repo), "--json"])).unwrap();
    j["vms"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|vm| vm["disks"].as_array().unwrap().iter())
        .flat_map(|d| d["sets"].as_array().unwrap().iter())
        .map(|s| s["points"].as_array().unwrap().len())
        .sum()
}

#[test]
fn qemu_nbd_plain_base_and_incremental() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (img, mut data) = disk(dp, 1);
    let sock = dp.join("q.sock");
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(40);
    let uri = format!("nbd+unix:///disk?socket={}", s(&sock));
    {
        let _q = qemu_nbd(&sock, &img, &[]);
        let out = ok(&[
            "import",
            s(&repo),
            "--vdi",
            &v,
            "--nbd",
            &uri,
            "--connections",
            "4",
            "--time",
            &time(0),
            "--json",
        ]);
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        let nonzero = data
            .chunks(BS)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count();
        assert_eq!(j["stored_blocks"], nonzero as u64);
        assert!(latest(&repo, &v) == data);
    }
    // Change some blocks; fetch only what the bitmap marks.
    let mut rng = TestRng::new(2);
    let changed = [3u64, 4, 100, 255];
    for &b in &changed {
        rng.fill(&mut data[b as usize * BS..(b as usize + 1) * BS]);
    }
    data[50 * BS..51 * BS].fill(0);
    std::fs::write(&img, &data).unwrap();
    let bm = write_bitmap(dp, "bm", &[3, 4, 50, 100, 255], 256);
    let _q = qemu_nbd(&sock, &img, &[]);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--bitmap",
        s(&bm),
        "--time",
        &time(1),
    ]);
    assert!(latest(&repo, &v) == data);
    ok(&["verify", s(&repo)]);
}

#[test]
fn qemu_nbd_tls_with_a_ca() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (img, data) = disk(dp, 3);
    let creds = dp.join("creds");
    let ca = ca_signed(&creds, "nbd.example");
    let sock = dp.join("q.sock");
    let obj = format!(
        "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={}",
        s(&creds)
    );
    let _q = qemu_nbd(&sock, &img, &["--object", &obj, "--tls-creds", "tls0"]);
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(41);
    let uri = format!("nbds+unix:///disk?socket={}", s(&sock));
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--ca-cert",
        s(&ca),
        "--tls-subject",
        "nbd.example",
        "--time",
        &time(0),
    ]);
    assert!(latest(&repo, &v) == data);
    // The CA's certificate for the wrong name is refused.
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--ca-cert",
        s(&ca),
        "--tls-subject",
        "other.example",
        "--time",
        &time(1),
    ]);
    assert!(m.contains("TLS failed"), "{m}");
    // Plain NBD to a TLS-only server: refused, and says what to do.
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri.replace("nbds", "nbd"),
        "--time",
        &time(1),
    ]);
    assert!(m.contains("requires TLS"), "{m}");
    assert_eq!(count_points(&repo), 1);
}

#[test]
fn nbdkit_tls_pinned_self_signed_certificate() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (img, data) = disk(dp, 4);
    let cert = self_signed(&dp.join("host"), "xs-host.example");
    let other = self_signed(&dp.join("other"), "xs-host.example");
    let sock = dp.join("k.sock");
    let creds = dp.join("host");
    let _k = nbdkit(
        &sock,
        &img,
        &[
            "--tls=require",
            &format!("--tls-certificates={}", s(&creds)),
        ],
        &[],
    );
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(42);
    let uri = format!("nbds+unix:///?socket={}", s(&sock));
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--tls-cert",
        s(&cert),
        "--tls-subject",
        "xs-host.example",
        "--connections",
        "16",
        "--time",
        &time(0),
    ]);
    assert!(latest(&repo, &v) == data);
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--tls-cert",
        s(&other),
        "--tls-subject",
        "xs-host.example",
        "--time",
        &time(1),
    ]);
    assert!(m.contains("pinned certificate mismatch"), "{m}");
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--tls-cert",
        s(&cert),
        "--tls-subject",
        "someone-else",
        "--time",
        &time(1),
    ]);
    assert!(m.contains("subject mismatch"), "{m}");
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--time",
        &time(1),
    ]);
    assert!(m.contains("--tls-cert"), "{m}");
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--tls-cert",
        s(&cert),
        "--tls-subject",
        "xs-host.example",
        "--connections",
        "17",
        "--time",
        &time(1),
    ]);
    assert!(m.contains("1 to 16"), "{m}");
    assert_eq!(count_points(&repo), 1);
}

#[test]
fn server_without_tls_is_not_used_in_plain_text_when_tls_is_asked() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (img, _) = disk(dp, 5);
    let cert = self_signed(&dp.join("c"), "h.example");
    let sock = dp.join("q.sock");
    let _q = qemu_nbd(&sock, &img, &[]);
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let uri = format!("nbds+unix:///disk?socket={}", s(&sock));
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &vdi(43),
        "--nbd",
        &uri,
        "--tls-cert",
        s(&cert),
        "--tls-subject",
        "h.example",
        "--time",
        &time(0),
    ]);
    assert!(
        m.contains("does not offer TLS") && m.contains("refusing"),
        "{m}"
    );
}

#[test]
fn server_without_structured_replies_or_block_status() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (img, data) = disk(dp, 6);
    let sock = dp.join("k.sock");
    let _k = nbdkit(&sock, &img, &["--no-sr"], &[]);
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(44);
    let out = ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &format!("nbd+unix:///?socket={}", s(&sock)),
        "--time",
        &time(0),
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let nonzero = data
        .chunks(BS)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count();
    assert_eq!(
        j["stored_blocks"], nonzero as u64,
        "zero blocks detected on the client"
    );
    assert!(latest(&repo, &v) == data);
}

#[test]
fn error_replies_are_retried_and_permanent_errors_leave_no_point() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (img, data) = disk(dp, 7);
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(45);
    {
        let sock = dp.join("e.sock");
        let _k = nbdkit(
            &sock,
            &img,
            &[],
            &["--filter=error", "error=EIO", "error-pread-rate=15%"],
        );
        ok(&[
            "import",
            s(&repo),
            "--vdi",
            &v,
            "--nbd",
            &format!("nbd+unix:///?socket={}", s(&sock)),
            "--time",
            &time(0),
        ]);
        assert!(latest(&repo, &v) == data);
    }
    let before = repo_objects(&repo);
    let sock = dp.join("f.sock");
    let _k = nbdkit(
        &sock,
        &img,
        &[],
        &["--filter=error", "error=EIO", "error-pread-rate=100%"],
    );
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &format!("nbd+unix:///?socket={}", s(&sock)),
        "--time",
        &time(1),
    ]);
    assert!(
        m.contains("failed 5 times") && m.contains("offset") && m.contains("EIO"),
        "{m}"
    );
    assert_eq!(count_points(&repo), 1);
    ok(&["verify", s(&repo)]);
    // The failed backup took back everything it had written (packs, chunk index objects).
    let after = repo_objects(&repo);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert!(after == before, "an object changed");
}

/// Forwards connections to `upstream`, cutting each of the first `cuts` after `after` bytes
/// from the server.
fn cutting_proxy(listen: &Path, upstream: PathBuf, after: usize, cuts: usize) -> Arc<AtomicUsize> {
    let l = UnixListener::bind(listen).unwrap();
    let cut = Arc::new(AtomicUsize::new(0));
    let c2 = cut.clone();
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { break };
            let Ok(server) = UnixStream::connect(&upstream) else {
                break;
            };
            let limit = if c2.fetch_add(1, Ordering::SeqCst) < cuts {
                Some(after)
            } else {
                None
            };
            let (mut c_rd, mut s_wr) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_rd, &mut s_wr);
            });
            let (mut s_rd, mut c_wr) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut sent = 0;
                loop {
                    let n = match s_rd.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let n = match limit {
                        Some(l) if sent + n >= l => {
                            let _ = c_wr.write_all(&buf[..l - sent]);
                            let _ = c_wr.shutdown(std::net::Shutdown::Both);
                            let _ = s_rd.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                        _ => n,
                    };
                    if c_wr.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
            });
        }
    });
    cut
}

#[test]
fn connections_cut_mid_transfer_are_reconnected() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (img, data) = disk(dp, 8);
    let sock = dp.join("q.sock");
    let _q = qemu_nbd(&sock, &img, &[]);
    let proxy = dp.join("p.sock");
    // The first 6 connections die after 3 MiB each.
    let conns = cutting_proxy(&proxy, sock.clone(), 3 << 20, 6);
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(46);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &format!("nbd+unix:///disk?socket={}", s(&proxy)),
        "--connections",
        "2",
        "--time",
        &time(0),
    ]);
    assert!(latest(&repo, &v) == data);
    assert!(
        conns.load(Ordering::SeqCst) > 2,
        "no connection was cut: the test proved nothing"
    );
}

#[test]
fn xapi_like_server_export_name_tls12_and_connection_limit() {
    use cbtfs::sim::nbd::{ServerConfig, start};
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (img, data) = disk(dp, 9);
    let cert = self_signed(&dp.join("host"), "xs-host.example");
    let key = dp.join("host/server-key.pem");
    // xapi's export names: /VDI_UUID?session_id=... — the session must never be printed.
    let export = "/3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b?session_id=OpaqueRef:very-secret";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (port, accepted) = rt
        .block_on(start(ServerConfig {
            exports: std::sync::Arc::new(
                [(export.to_string(), img.clone())]
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            ),
            tls: Some((
                std::fs::read_to_string(&cert).unwrap(),
                std::fs::read_to_string(&key).unwrap(),
            )),
        }))
        .unwrap();
    let enc = "%2F3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b%3Fsession_id%3DOpaqueRef%3Avery-secret";
    let uri = format!("nbds://127.0.0.1:{port}/{enc}");
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(47);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--tls-cert",
        s(&cert),
        "--tls-subject",
        "xs-host.example",
        "--connections",
        "16",
        "--time",
        &time(0),
    ]);
    assert!(latest(&repo, &v) == data);
    // Only changed blocks, as the backup will fetch them.
    let bm = write_bitmap(dp, "bm", &[0, 7, 8, 9, 200], 256);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--tls-cert",
        s(&cert),
        "--tls-subject",
        "xs-host.example",
        "--bitmap",
        s(&bm),
        "--time",
        &time(1),
    ]);
    assert!(latest(&repo, &v) == data);

    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri.replace("nbds:", "nbd:"),
        "--time",
        &time(2),
    ]);
    assert!(
        m.contains("requires TLS") && !m.contains("very-secret"),
        "{m}"
    );
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &format!("nbds://127.0.0.1:{port}/nope"),
        "--tls-cert",
        s(&cert),
        "--tls-subject",
        "xs-host.example",
        "--time",
        &time(2),
    ]);
    assert!(m.contains("refused the export"), "{m}");
    let other = self_signed(&dp.join("other"), "xs-host.example");
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--tls-cert",
        s(&other),
        "--tls-subject",
        "xs-host.example",
        "--time",
        &time(2),
    ]);
    assert!(
        m.contains("pinned certificate mismatch")
            && m.contains("<redacted>")
            && !m.contains("very-secret"),
        "{m}"
    );

    // Sixteen connections at once are served; a seventeenth is closed at once.
    let target = cbtfs::nbd::Target {
        address: cbtfs::nbd::Address::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        export: export.into(),
        trust: Some(cbtfs::nbd::Trust::Pinned {
            cert_pem: std::fs::read_to_string(&cert).unwrap(),
            subject: "xs-host.example".into(),
        }),
    };
    rt.block_on(async {
        let mut open = Vec::new();
        for _ in 0..16 {
            open.push(cbtfs::nbd::Client::connect(&target, 4).await.unwrap());
        }
        let before = accepted.load(Ordering::SeqCst);
        let e = cbtfs::nbd::Client::connect(&target, 4)
            .await
            .err()
            .expect("17th refused");
        assert!(accepted.load(Ordering::SeqCst) > before);
        assert!(!e.to_string().contains("very-secret"), "{e}");
        for c in open {
            c.close().await;
        }
    });
    assert_eq!(count_points(&repo), 2);
}

#[test]
fn a_server_that_stops_answering_times_out_with_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (img, _) = disk(dp, 10);
    let sock = dp.join("slow.sock");
    // One nbdkit thread: with several, nbdkit itself sometimes aborts (an assertion in its
    // connections.c) when a client closes a connection whose delayed reply it is about to send,
    // and the run then ends with "connection lost" instead of the timeout this test is about.
    let _k = nbdkit(&sock, &img, &["-t", "1"], &["--filter=delay", "rdelay=30"]);
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let start = Instant::now();
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &vdi(48),
        "--nbd",
        &format!("nbd+unix:///?socket={}", s(&sock)),
        "--timeout",
        "1",
        "--connections",
        "2",
        "--time",
        &time(0),
    ]);
    assert!(
        m.contains("no answer") && m.contains("within 1 s") && m.contains("offset"),
        "{m}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(25),
        "gave up too late: {:?}",
        start.elapsed()
    );
    assert_eq!(count_points(&repo), 0);
}

/// nbd-server (the reference server from the NBD project) as a daemon on a free TCP port.
struct NbdServer {
    pid_file: PathBuf,
    port: u16,
}

impl NbdServer {
    fn start(dir: &Path, image: &Path) -> Option<NbdServer> {
        if Command::new("sh")
            .args(["-c", "command -v nbd-server"])
            .bounded()
            .is_ok_and(|o| !o.status.success())
        {
            skip("nbd-server is not installed (scripts/setup.sh installs it)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join("nbd-server.conf");
        let pid_file = dir.join("nbd-server.pid");
        std::fs::write(
            &conf,
            format!(
                "[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n    user = root\n    group = root\n[disk]\n    exportname = {}\n    readonly = true\n",
                s(image)
            ),
        )
        .unwrap();
        run("nbd-server", &["-C", s(&conf), "-p", s(&pid_file)]);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nbd-server not listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(NbdServer { pid_file, port })
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file)
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            // SAFETY: kill with the pid nbd-server wrote for the daemon this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

#[test]
fn nbd_server_base_and_incremental_over_tcp() {
    if !is_root() {
        skip("nbd-server's configuration here runs as root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let (img, mut data) = disk(dp, 9);
    let Some(server) = NbdServer::start(dp, &img) else {
        return;
    };
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(49);
    let uri = format!("nbd://127.0.0.1:{}/disk", server.port);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--connections",
        "4",
        "--time",
        &time(0),
    ]);
    assert!(latest(&repo, &v) == data);
    // nbd-server reads the file per request: change it in place, fetch the marked blocks.
    let mut rng = TestRng::new(10);
    for b in [0usize, 7, 199] {
        rng.fill(&mut data[b * BS..(b + 1) * BS]);
    }
    data[20 * BS..21 * BS].fill(0);
    std::fs::write(&img, &data).unwrap();
    let bm = write_bitmap(dp, "bm", &[0, 7, 20, 199], 256);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &uri,
        "--bitmap",
        s(&bm),
        "--connections",
        "2",
        "--time",
        &time(1),
    ]);
    assert!(latest(&repo, &v) == data);
    ok(&["verify", s(&repo)]);
}

/// A full disk mid-fetch fails cleanly: it names the cause, commits nothing, leaves no file
/// behind.
#[test]
fn full_disk_during_nbd_import_commits_nothing() {
    if !is_root() {
        skip("mounting a small tmpfs needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let small = dp.join("small");
    std::fs::create_dir(&small).unwrap();
    run(
        "mount",
        &["-t", "tmpfs", "-o", "size=6m", "tmpfs", s(&small)],
    );
    let _u = MountGuard(small.clone());
    let repo = small.join("repo");
    ok(&["init", s(&repo)]);
    let img = dp.join("img");
    let mut data = vec![0u8; 16 << 20]; // 16 MiB of data: does not fit in 6 MiB
    TestRng::new(41).fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let sock = dp.join("q.sock");
    let _q = qemu_nbd(&sock, &img, &[]);
    let uri = format!("nbd+unix:///disk?socket={}", s(&sock));
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &vdi(41),
        "--nbd",
        &uri,
        "--connections",
        "4",
        "--time",
        &time(0),
    ]);
    assert!(
        m.contains("disk is full") && m.contains("nothing partial was committed"),
        "{m}"
    );
    let left: Vec<String> = files_under(&repo)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "data" || e == "idx"))
        .map(|p| p.display().to_string())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(ok(&["ls", s(&repo)]).contains("holds no restore points"));
}

/// A hostile NBD server: fixed newstyle, written here from the NBD protocol document
/// (doc/proto.md of the NBD project) and sharing nothing with the client's codec, that
/// negotiates properly and then breaks the protocol in one chosen way.
mod hostile {
    use std::io::{self, Read, Write};
    use std::net::{TcpListener, TcpStream};

    // Magics as the document spells them ("NBDMAGIC", "IHAVEOPT" in ASCII).
    const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
    const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
    const OPTION_REPLY_MAGIC: u64 = 0x3e889045565a9;
    const REQUEST_MAGIC: u32 = 0x25609513;
    const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;
    const STRUCTURED_REPLY_MAGIC: u32 = 0x668e33ef;
    // Handshake flags: fixed newstyle, no zeroes.
    const SERVER_FLAGS: u16 = 0b11;
    // Options and their replies.
    const OPT_ABORT: u32 = 2;
    const OPT_GO: u32 = 7;
    const OPT_STRUCTURED_REPLY: u32 = 8;
    const OPT_SET_META_CONTEXT: u32 = 10;
    const REP_ACK: u32 = 1;
    const REP_INFO: u32 = 3;
    const REP_META_CONTEXT: u32 = 4;
    const REP_ERR_UNSUP: u32 = 0x8000_0001;
    const INFO_EXPORT: u16 = 0;
    // Transmission flags: has flags, read only.
    const TRANSMISSION_FLAGS: u16 = 0b11;
    // Commands, chunk types and flags.
    const CMD_READ: u16 = 0;
    const CMD_DISC: u16 = 2;
    const CMD_BLOCK_STATUS: u16 = 7;
    const CHUNK_NONE: u16 = 0;
    const CHUNK_OFFSET_DATA: u16 = 1;
    const CHUNK_BLOCK_STATUS: u16 = 5;
    const FLAG_DONE: u16 = 1;
    /// The id this server gives `base:allocation`.
    const CONTEXT: u32 = 7;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Misbehave {
        /// A data chunk whose offset plus length wraps past 2^64.
        WrappedOffset,
        /// A block status reply whose only extent is empty.
        ZeroExtent,
        /// Block status chunks without the DONE flag, without end.
        StatusFlood,
        /// NBD_OPT_GO acknowledged without NBD_INFO_EXPORT.
        GoWithoutSize,
        /// NBD_INFO_EXPORT states this size, whatever the export is.
        WrongSize(u64),
        /// A simple reply whose cookie names no request.
        UnknownCookie,
        /// A correct reply, then a further chunk for the same (finished) request.
        ChunkAfterDone,
        /// A reply right after the handshake, before any request.
        ReplyNeverSent,
        /// A data chunk carrying more bytes than the request asked for.
        ChunkLongerThanRequest,
        /// The reply's data stops halfway and the connection closes.
        CutMidReply,
    }

    /// The export's byte at `offset` (when this server serves data correctly).
    pub fn byte(offset: u64) -> u8 {
        (offset.wrapping_mul(31) >> 9) as u8
    }

    /// Serve on an ephemeral port of 127.0.0.1 until the test process ends.
    pub fn start(size: u64, how: Misbehave) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = serve(s, size, how);
                });
            }
        });
        port
    }

    fn opt_reply(s: &mut TcpStream, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(opt.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        s.write_all(&b)
    }

    fn simple(s: &mut TcpStream, error: u32, cookie: u64, data: &[u8]) -> io::Result<()> {
        let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(error.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(data);
        s.write_all(&b)
    }

    /// A structured reply chunk's header; `len` is the payload length it announces.
    fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> Vec<u8> {
        let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(flags.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(len.to_be_bytes());
        b
    }

    fn data(offset: u64, len: u64) -> Vec<u8> {
        (offset..offset + len).map(byte).collect()
    }

    fn offers_status(how: Misbehave) -> bool {
        matches!(how, Misbehave::ZeroExtent | Misbehave::StatusFlood)
    }

    fn serve(mut s: TcpStream, size: u64, how: Misbehave) -> io::Result<()> {
        let mut g = NBDMAGIC.to_vec();
        g.extend(IHAVEOPT);
        g.extend(SERVER_FLAGS.to_be_bytes());
        s.write_all(&g)?;
        let mut client_flags = [0u8; 4];
        s.read_exact(&mut client_flags)?;
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h)?;
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            if &h[..8] != IHAVEOPT || len > 65536 {
                return Ok(());
            }
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body)?;
            match opt {
                OPT_STRUCTURED_REPLY => opt_reply(&mut s, opt, REP_ACK, &[])?,
                OPT_SET_META_CONTEXT => {
                    if offers_status(how) {
                        let mut c = CONTEXT.to_be_bytes().to_vec();
                        c.extend(b"base:allocation");
                        opt_reply(&mut s, opt, REP_META_CONTEXT, &c)?;
                    }
                    opt_reply(&mut s, opt, REP_ACK, &[])?;
                }
                OPT_GO => {
                    let stated = match how {
                        Misbehave::GoWithoutSize => None,
                        Misbehave::WrongSize(n) => Some(n),
                        _ => Some(size),
                    };
                    if let Some(n) = stated {
                        let mut i = INFO_EXPORT.to_be_bytes().to_vec();
                        i.extend(n.to_be_bytes());
                        i.extend(TRANSMISSION_FLAGS.to_be_bytes());
                        opt_reply(&mut s, opt, REP_INFO, &i)?;
                    }
                    opt_reply(&mut s, opt, REP_ACK, &[])?;
                    break;
                }
                OPT_ABORT => {
                    opt_reply(&mut s, opt, REP_ACK, &[])?;
                    return Ok(());
                }
                _ => opt_reply(&mut s, opt, REP_ERR_UNSUP, &[])?,
            }
        }
        if how == Misbehave::ReplyNeverSent {
            simple(&mut s, 0, 0x5eed_0000_0000_0001, &data(0, 512))?;
        }
        let mut answered = 0u64;
        loop {
            let mut r = [0u8; 28];
            s.read_exact(&mut r)?;
            if u32::from_be_bytes(r[0..4].try_into().unwrap()) != REQUEST_MAGIC {
                return Ok(());
            }
            let cmd = u16::from_be_bytes(r[6..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
            let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
            let len = u32::from_be_bytes(r[24..28].try_into().unwrap());
            match cmd {
                CMD_DISC => return Ok(()),
                CMD_BLOCK_STATUS if how == Misbehave::ZeroExtent => {
                    let mut p = CONTEXT.to_be_bytes().to_vec();
                    p.extend(0u32.to_be_bytes()); // length 0
                    p.extend(0u32.to_be_bytes()); // flags: data
                    let mut b = chunk_header(FLAG_DONE, CHUNK_BLOCK_STATUS, cookie, p.len() as u32);
                    b.extend(p);
                    s.write_all(&b)?;
                }
                CMD_BLOCK_STATUS if how == Misbehave::StatusFlood => {
                    // 4096 extents of 512 bytes per chunk, chunk after chunk, never DONE.
                    let mut p = CONTEXT.to_be_bytes().to_vec();
                    for _ in 0..4096 {
                        p.extend(512u32.to_be_bytes());
                        p.extend(0u32.to_be_bytes());
                    }
                    let mut b = chunk_header(0, CHUNK_BLOCK_STATUS, cookie, p.len() as u32);
                    b.extend(p);
                    loop {
                        s.write_all(&b)?; // until the client hangs up
                    }
                }
                CMD_READ => match how {
                    Misbehave::WrappedOffset => {
                        let mut b = chunk_header(FLAG_DONE, CHUNK_OFFSET_DATA, cookie, 8 + len);
                        b.extend((u64::MAX - 100).to_be_bytes());
                        b.extend(data(0, len as u64));
                        s.write_all(&b)?;
                    }
                    Misbehave::UnknownCookie => simple(
                        &mut s,
                        0,
                        cookie ^ 0xffff_0000_0000_0000,
                        &data(offset, len as u64),
                    )?,
                    Misbehave::ChunkAfterDone if answered == 0 => {
                        let mut b = chunk_header(FLAG_DONE, CHUNK_OFFSET_DATA, cookie, 8 + len);
                        b.extend(offset.to_be_bytes());
                        b.extend(data(offset, len as u64));
                        b.extend(chunk_header(FLAG_DONE, CHUNK_NONE, cookie, 0));
                        s.write_all(&b)?;
                    }
                    Misbehave::ChunkLongerThanRequest => {
                        let more = len as u64 + 65536;
                        let mut b =
                            chunk_header(FLAG_DONE, CHUNK_OFFSET_DATA, cookie, 8 + more as u32);
                        b.extend(offset.to_be_bytes());
                        b.extend(data(offset, more));
                        s.write_all(&b)?;
                    }
                    Misbehave::CutMidReply => {
                        let mut b = chunk_header(FLAG_DONE, CHUNK_OFFSET_DATA, cookie, 8 + len);
                        b.extend(offset.to_be_bytes());
                        b.extend(data(offset, len as u64 / 2));
                        s.write_all(&b)?;
                        return Ok(()); // closes mid-reply
                    }
                    _ => {
                        let end = offset.saturating_add(len as u64).min(size);
                        simple(&mut s, 0, cookie, &data(offset, end.saturating_sub(offset)))?
                    }
                },
                _ => {
                    simple(&mut s, 22, cookie, &[])?; // EINVAL
                    return Ok(());
                }
            }
            answered += 1;
        }
    }
}

/// How a child process ended: success, its output, how long it took, its peak RSS (bytes).
struct Measured {
    success: bool,
    output: String,
    elapsed: Duration,
    peak_rss: u64,
}

/// Run cbtfs with `args`, measuring its peak RSS (GNU time's report of that very process). A
/// child still running after `limit` is killed, so a hang fails the test rather than stalling it.
fn measured(args: &[&str], dir: &Path, limit: Duration) -> Measured {
    let (out, err) = (dir.join("child.out"), dir.join("child.err"));
    let rss = dir.join("child.rss");
    // Through GNU time: a child started by this process records this process's own peak at
    // exec (the kernel keeps the larger of the old and new image's), and the test process runs
    // many tests; time's fresh, small image forks the one measured.
    let time = Path::new("/usr/bin/time");
    assert!(
        time.exists(),
        "/usr/bin/time (package time; scripts/setup.sh installs it) measures the child's peak RSS"
    );
    let start = Instant::now();
    let child = Command::new(time)
        .args(["-f", "%M", "-o"])
        .arg(&rss)
        .arg(bin())
        .env("CBTFS_KEY_FILE", key_file())
        .args(args)
        // Its own group: the watchdog kills time and cbtfs together.
        .process_group(0)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            // SAFETY: signals the group of the child spawned above, which is not reaped yet
            // (wait4 below has not returned, or this thread would have been told).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    });
    let mut status = 0;
    // SAFETY: rusage is plain data; all-zero is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; status and ru are valid for writes.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let elapsed = start.elapsed();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    assert_eq!(r, pid, "wait4");
    drop(child);
    Measured {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        output: format!(
            "{}{}",
            std::fs::read_to_string(&err).unwrap_or_default(),
            std::fs::read_to_string(&out).unwrap_or_default()
        ),
        elapsed,
        peak_rss: std::fs::read_to_string(&rss)
            .ok()
            .and_then(|t| t.lines().last()?.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("no peak RSS from /usr/bin/time in {}", rss.display())),
    }
}

/// Nothing of a failed run is in the repository: no point, no data or index file.
fn assert_nothing_committed(repo: &Path) {
    let left: Vec<String> = files_under(repo)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "data" || e == "idx"))
        .map(|p| p.display().to_string())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(count_points(repo), 0);
}

/// Seconds an NBD read may take in the hostile tests; giving up must take well under
/// attempts (5) × this.
const HOSTILE_TIMEOUT: u64 = 10;
/// Peak RSS a failed import may reach (the binary, the runtime, a window of requests).
const HOSTILE_RSS: u64 = 200 << 20;

/// Import from a server misbehaving as `how`; it must fail fast, saying `expect`, within
/// bounded memory, committing nothing.
fn hostile_import(how: hostile::Misbehave, expect: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let port = hostile::start(8 << 20, how);
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let timeout = HOSTILE_TIMEOUT.to_string();
    let m = measured(
        &[
            "import",
            s(&repo),
            "--vdi",
            &vdi(60),
            "--nbd",
            &uri,
            "--connections",
            "2",
            "--timeout",
            &timeout,
            "--time",
            &time(0),
        ],
        dp,
        Duration::from_secs(5 * HOSTILE_TIMEOUT + 30),
    );
    assert!(!m.success, "{how:?}: the import succeeded: {}", m.output);
    for e in expect {
        assert!(m.output.contains(e), "{how:?}: {e:?} not in: {}", m.output);
    }
    assert!(
        m.elapsed < Duration::from_secs(HOSTILE_TIMEOUT),
        "{how:?}: took {:?} to fail (timeout {HOSTILE_TIMEOUT} s): {}",
        m.elapsed,
        m.output
    );
    assert!(
        m.peak_rss < HOSTILE_RSS,
        "{how:?}: peak RSS {} MiB",
        m.peak_rss >> 20
    );
    assert_nothing_committed(&repo);
}

#[test]
fn hostile_wrapped_data_offset() {
    hostile_import(
        hostile::Misbehave::WrappedOffset,
        &[
            "127.0.0.1",
            "protocol error",
            "data chunk outside its request",
        ],
    );
}

#[test]
fn hostile_zero_length_extent() {
    hostile_import(
        hostile::Misbehave::ZeroExtent,
        &["protocol error", "zero-length extent"],
    );
}

#[test]
fn hostile_status_flood_without_done() {
    hostile_import(
        hostile::Misbehave::StatusFlood,
        &[
            "protocol error",
            "a second block status chunk for one request",
        ],
    );
}

#[test]
fn hostile_go_without_export_size() {
    hostile_import(
        hostile::Misbehave::GoWithoutSize,
        &["without stating its size", "NBD_INFO_EXPORT"],
    );
}

#[test]
fn hostile_unknown_cookie() {
    hostile_import(
        hostile::Misbehave::UnknownCookie,
        &["protocol error", "names no request in flight"],
    );
}

#[test]
fn hostile_chunk_after_done() {
    hostile_import(
        hostile::Misbehave::ChunkAfterDone,
        &["protocol error", "names no request in flight"],
    );
}

#[test]
fn hostile_reply_to_a_request_never_sent() {
    hostile_import(
        hostile::Misbehave::ReplyNeverSent,
        &["protocol error", "cookie 0x5eed000000000001", "never sent"],
    );
}

#[test]
fn hostile_chunk_longer_than_its_request() {
    hostile_import(
        hostile::Misbehave::ChunkLongerThanRequest,
        &["protocol error", "bytes where at most"],
    );
}

#[test]
fn hostile_reply_cut_midway_is_retried_then_given_up() {
    hostile_import(
        hostile::Misbehave::CutMidReply,
        &["failed 5 times", "connection"],
    );
}

/// The hostile server's data, when it serves data correctly, arrives byte for byte (the
/// scenarios above fail for what they break, not for the server itself).
#[test]
fn hostile_server_serves_correctly_when_it_behaves() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let size = 3 << 20;
    let port = hostile::start(size, hostile::Misbehave::WrongSize(size));
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(61);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--nbd",
        &format!("nbd://127.0.0.1:{port}/disk"),
        "--time",
        &time(0),
    ]);
    let want: Vec<u8> = (0..size).map(hostile::byte).collect();
    assert!(latest(&repo, &v) == want);
}

/// Defect 8 through `cbtfs backup`: the host's get_nbd_info names a server that states no
/// size, or a size other than the snapshot's. The backup fails, commits nothing, and never
/// data-destroys the snapshot.
#[test]
fn backup_refuses_an_export_of_unknown_or_wrong_size() {
    use cbtfs::sim::{Sim, SimConfig};
    let disk_size: u64 = 4 << 20;
    for (how, expect) in [
        (
            hostile::Misbehave::GoWithoutSize,
            "without stating its size",
        ),
        (hostile::Misbehave::WrongSize(0), "is 0 bytes but snapshot"),
        (
            hostile::Misbehave::WrongSize(disk_size / 2),
            "is 2097152 bytes but snapshot",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let dp = d.path();
        let c = SimConfig::new(&dp.join("sim"));
        let pw = dp.join("password");
        std::fs::write(&pw, format!("{}\n", c.password)).unwrap();
        let sim = Sim::start(c).unwrap();
        let img = dp.join("disk.img");
        let mut data = vec![0u8; disk_size as usize];
        TestRng::new(62).fill(&mut data);
        std::fs::write(&img, &data).unwrap();
        let (_, vdis) = sim.add_vm("vm1", &[("root", &img)]).unwrap();
        let port = hostile::start(disk_size, how);
        sim.with(|st| {
            // An insecure_nbd network: its server speaks plain NBD.
            st.net.set_purpose(&["insecure_nbd"]);
            st.nbd_override = Some((
                "127.0.0.1".into(),
                port,
                "disk".into(),
                String::new(),
                String::new(),
            ))
        });
        let repo = dp.join("repo");
        ok(&["init", s(&repo)]);
        let m = measured(
            &[
                "backup",
                s(&repo),
                "--host",
                &sim.url,
                "--password-file",
                s(&pw),
                "--vdi",
                &vdis[0],
                "--allow-plain-nbd",
                "--timeout",
                &HOSTILE_TIMEOUT.to_string(),
            ],
            dp,
            Duration::from_secs(5 * HOSTILE_TIMEOUT + 60),
        );
        assert!(!m.success, "{how:?}: the backup succeeded: {}", m.output);
        assert!(m.output.contains(expect), "{how:?}: {}", m.output);
        assert!(
            m.elapsed < Duration::from_secs(HOSTILE_TIMEOUT),
            "{how:?}: {:?}",
            m.elapsed
        );
        assert!(
            m.peak_rss < HOSTILE_RSS,
            "{how:?}: {} MiB",
            m.peak_rss >> 20
        );
        assert_nothing_committed(&repo);
        let (calls, destroyed) = sim.with(|st| {
            (
                st.calls.clone(),
                st.vdis
                    .values()
                    .filter(|v| v.kind == "cbt_metadata")
                    .map(|v| v.uuid.clone())
                    .collect::<Vec<_>>(),
            )
        });
        assert!(calls.iter().any(|c| c == "VDI.get_nbd_info"), "{calls:?}");
        assert!(
            !calls.iter().any(|c| c == "VDI.data_destroy"),
            "{how:?}: data_destroy was called: {calls:?}"
        );
        assert!(
            destroyed.is_empty(),
            "{how:?}: data-destroyed: {destroyed:?}"
        );
        // The disk itself is untouched.
        assert!(sim.read_vdi(&vdis[0]).unwrap() == data);
    }
}
