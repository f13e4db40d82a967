//! The NBD fetcher against real servers: qemu-nbd (plain, TLS with a CA) and nbdkit (TLS with a
//! self-signed certificate like XenServer's, no structured replies, injected errors), plus a
//! proxy that cuts connections mid-transfer. Data fetched must equal the source byte for byte.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

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
    let names: Vec<_> = std::fs::read_dir(repo.join("disks").join(&v))
        .unwrap()
        .flat_map(|s| std::fs::read_dir(s.unwrap().path()).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".data")).count(),
        1,
        "{names:?}"
    );
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
    let _k = nbdkit(&sock, &img, &[], &["--filter=delay", "rdelay=30"]);
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
            .output()
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
