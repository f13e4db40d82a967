//! The configuration file of backup jobs (`/etc/cbtfs/cbtfs.toml`, or `--config FILE`):
//! hosts, repositories and jobs.
//!
//! ```toml
//! [host.xs1]
//! url = "https://xs1.example"
//! user = "root"
//! password_file = "/etc/cbtfs/xs1.password"
//!
//! [repository.main]
//! path = "/backup/repo"            # or "s3://bucket/prefix"
//! password_file = "/etc/cbtfs/repo.password"
//!
//! [job.nightly]
//! host = "xs1"
//! repository = "main"
//! vms = ["*"]                      # names or globs; "tag:NAME", "pool:NAME", "uuid:UUID"
//! exclude = ["test-*"]
//! concurrency = 4
//! schedule = "*-*-* 02:00:00"      # systemd OnCalendar
//! keep = { last = 7, daily = 14, weekly = 8, monthly = 12 }
//! report = "/var/log/cbtfs/nightly.json"
//! metrics = "/var/lib/prometheus/node-exporter/cbtfs.prom"
//! ```
//!
//! The file is read in one pass that collects every problem with its line: syntax errors
//! (the `toml` crate's recovering parser), unknown keys (a typo must not silently turn a
//! setting off), wrong types, references to hosts or repositories that are not defined, bad
//! globs, durations and schedules. Nothing is read from the files it names (password files,
//! certificates) here: `cbtfs config check` does that separately, so that a config can be
//! checked where the secrets are not.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::de::{DeTable, DeValue};

use super::schedule;

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/cbtfs/cbtfs.toml";

/// The most bytes of a configuration file read (a config is a few KiB; anything else is a
/// mistake, not a config).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The host's limit of NBD connections in total (XenServer's), shared by a job's disks.
pub const HOST_NBD_LIMIT: usize = crate::nbd::fetch::MAX_CONNECTIONS;

/// Names of hosts, repositories and jobs: used in unit names and file names.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with('.')
}

#[derive(Debug, Clone, Serialize)]
pub struct HostConf {
    pub url: String,
    pub user: String,
    pub password_file: PathBuf,
    /// A CA certificate (PEM) to verify the host with, instead of the pinned certificate.
    pub ca_cert: Option<PathBuf>,
    /// Skip certificate checks entirely (explicit opt-out).
    pub insecure_tls: bool,
    /// NBD connections the host allows in total (XenServer: 16).
    pub nbd_connections: usize,
    /// Seconds a request to the host may take.
    pub timeout: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepoConf {
    /// A local directory or `s3://BUCKET/PREFIX`.
    pub path: String,
    pub password_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub s3_endpoint: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

/// Which VMs a job takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", content = "value", rename_all = "lowercase")]
pub enum Selector {
    /// A name or a glob over names (`*`, `?`).
    Name(String),
    Tag(String),
    Pool(String),
    Uuid(String),
}

impl Selector {
    fn parse(s: &str) -> Result<Selector, String> {
        let (kind, v) = match s.split_once(':') {
            Some(("tag", v)) => ("tag", v),
            Some(("pool", v)) => ("pool", v),
            Some(("uuid", v)) => ("uuid", v),
            _ => ("name", s),
        };
        if v.is_empty() {
            return Err(format!(
                "{s:?} selects nothing: give a name after the colon"
            ));
        }
        if v.len() > 256 {
            return Err(format!("{s:?} is longer than 256 characters"));
        }
        Ok(match kind {
            "tag" => Selector::Tag(v.to_string()),
            "pool" => Selector::Pool(v.to_string()),
            "uuid" => {
                if !crate::repo::valid_uuid(&v.to_ascii_lowercase()) {
                    return Err(format!("{s:?}: {v:?} is not a uuid"));
                }
                Selector::Uuid(v.to_ascii_lowercase())
            }
            _ => Selector::Name(v.to_string()),
        })
    }

    /// Whether a VM with these facts is selected.
    pub fn matches(&self, vm: &VmFacts<'_>) -> bool {
        match self {
            Selector::Name(g) => glob_match(g, vm.name),
            Selector::Tag(t) => vm.tags.iter().any(|x| x == t),
            Selector::Pool(p) => glob_match(p, vm.pool),
            Selector::Uuid(u) => vm.uuid.eq_ignore_ascii_case(u),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Name(v) => write!(f, "{v}"),
            Selector::Tag(v) => write!(f, "tag:{v}"),
            Selector::Pool(v) => write!(f, "pool:{v}"),
            Selector::Uuid(v) => write!(f, "uuid:{v}"),
        }
    }
}

/// What a selector looks at.
#[derive(Debug, Clone, Copy)]
pub struct VmFacts<'a> {
    pub name: &'a str,
    pub uuid: &'a str,
    pub tags: &'a [String],
    pub pool: &'a str,
}

/// `*` any run of characters, `?` one character; everything else literal. Iterative with one
/// backtrack point, so O(len(pattern) × len(name)) at worst.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || (p[i] != '*' && p[i] == n[j])) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// When notifications go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NotifyWhen {
    #[default]
    Failure,
    Always,
}

/// The shape of the webhook's JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// The run's report as is.
    #[default]
    Json,
    /// `{"text": ...}`: Slack's incoming webhooks (and Mattermost, Rocket.Chat).
    Slack,
    /// A MessageCard: Microsoft Teams' incoming webhooks.
    Teams,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NotifyConf {
    pub webhook: Option<String>,
    pub webhook_format: WebhookFormat,
    /// Mail recipients, sent through `sendmail`.
    pub mail: Vec<String>,
    pub sendmail: Option<PathBuf>,
    pub when: NotifyWhen,
}

/// A job's health check after its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Check every guest filesystem of each disk's newest point with its read-only checker.
    Fsck,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobConf {
    pub host: String,
    pub repository: String,
    pub vms: Vec<Selector>,
    pub exclude: Vec<Selector>,
    /// Disks backed up at once.
    pub concurrency: usize,
    /// NBD connections per disk (the job's total stays within the host's limit).
    pub connections: usize,
    /// systemd OnCalendar expression.
    pub schedule: Option<String>,
    pub keep: crate::prune::Policy,
    pub report: Option<PathBuf>,
    pub metrics: Option<PathBuf>,
    /// A repository (by name) every run's new points are copied to.
    pub copy_to: Option<String>,
    pub notify: NotifyConf,
    pub health: Option<Health>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub path: PathBuf,
    pub hosts: BTreeMap<String, HostConf>,
    pub repositories: BTreeMap<String, RepoConf>,
    pub jobs: BTreeMap<String, JobConf>,
}

/// One thing wrong with a config, where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// 1-based; 0 when the problem has no place (the file as a whole).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the configuration {path} is larger than {MAX_CONFIG_BYTES} bytes: is it the right file?"
    )]
    TooLarge { path: String },
    #[error("{}", render(.path, .problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

fn render(path: &str, problems: &[Problem]) -> String {
    let mut s = format!(
        "{path}: {} found; nothing was run",
        match problems.len() {
            1 => "1 problem".to_string(),
            n => format!("{n} problems"),
        }
    );
    for p in problems {
        if p.line > 0 {
            s.push_str(&format!(
                "\n  {path}:{}:{}: {}",
                p.line, p.column, p.message
            ));
        } else {
            s.push_str(&format!("\n  {path}: {}", p.message));
        }
    }
    s
}

impl Config {
    /// Read and check `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let read = |source| ConfigError::Read {
            path: shown.clone(),
            source,
        };
        let f = std::fs::File::open(path).map_err(read)?;
        let mut text = String::new();
        f.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path: shown });
        }
        Config::parse(&text, path)
    }

    /// Check `text` (the contents of `path`).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut c = Checker {
            text,
            problems: Vec::new(),
        };
        let (root, errors) = DeTable::parse_recoverable(text);
        for e in errors {
            let at = e.span().map(|r| r.start).unwrap_or(0);
            c.problem_at(at, e.message().trim().to_string());
        }
        let config = c.config(root.get_ref(), path);
        if c.problems.is_empty() {
            Ok(config)
        } else {
            c.problems.sort_by_key(|p| (p.line, p.column));
            c.problems.dedup();
            Err(ConfigError::Invalid {
                path: path.display().to_string(),
                problems: c.problems,
            })
        }
    }

    pub fn job(&self, name: &str) -> Option<&JobConf> {
        self.jobs.get(name)
    }
}

struct Checker<'t> {
    text: &'t str,
    problems: Vec<Problem>,
}

type Item<'i> = (
    &'i toml::Spanned<toml::de::DeString<'i>>,
    &'i toml::Spanned<DeValue<'i>>,
);

impl Checker<'_> {
    fn problem_at(&mut self, at: usize, message: String) {
        let before = self.text.get(..at.min(self.text.len())).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        self.problems.push(Problem {
            line,
            column,
            message,
        });
    }

    fn problem(&mut self, span: Range<usize>, message: String) {
        self.problem_at(span.start, message);
    }

    fn config(&mut self, root: &DeTable<'_>, path: &Path) -> Config {
        let mut config = Config {
            path: path.to_path_buf(),
            hosts: BTreeMap::new(),
            repositories: BTreeMap::new(),
            jobs: BTreeMap::new(),
        };
        let mut job_items = Vec::new();
        for (k, v) in root.iter() {
            let Some(table) = self.table(k.get_ref(), v) else {
                continue;
            };
            match k.get_ref().as_ref() {
                "host" => {
                    for (name, v) in table.iter() {
                        if let Some(t) = self.named_table("host", name, v)
                            && let Some(h) = self.host(name.get_ref(), t, v.span())
                        {
                            config.hosts.insert(name.get_ref().to_string(), h);
                        }
                    }
                }
                "repository" => {
                    for (name, v) in table.iter() {
                        if let Some(t) = self.named_table("repository", name, v)
                            && let Some(r) = self.repository(name.get_ref(), t, v.span())
                        {
                            config.repositories.insert(name.get_ref().to_string(), r);
                        }
                    }
                }
                "job" => {
                    for (name, v) in table.iter() {
                        if let Some(t) = self.named_table("job", name, v) {
                            job_items.push((name, t, v.span()));
                        }
                    }
                }
                other => self.problem(
                    k.span(),
                    format!(
                        "unknown section [{other}]: a config has [host.NAME], [repository.NAME] and [job.NAME]"
                    ),
                ),
            }
        }
        for (name, t, span) in job_items {
            if let Some(j) = self.job(name.get_ref(), t, span, &config) {
                config.jobs.insert(name.get_ref().to_string(), j);
            }
        }
        config
    }

    fn table<'a, 'i>(
        &mut self,
        key: &str,
        v: &'a toml::Spanned<DeValue<'i>>,
    ) -> Option<&'a DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.problem(v.span(), format!("{key} must be a table"));
                None
            }
        }
    }

    fn named_table<'a, 'i>(
        &mut self,
        section: &str,
        name: &toml::Spanned<toml::de::DeString<'i>>,
        v: &'a toml::Spanned<DeValue<'i>>,
    ) -> Option<&'a DeTable<'i>> {
        if !valid_name(name.get_ref()) {
            self.problem(
                name.span(),
                format!(
                    "[{section}.{}]: a name is 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
                    name.get_ref()
                ),
            );
        }
        self.table(&format!("[{section}.{}]", name.get_ref()), v)
    }

    /// Check every key of `t` is one of `known`; returns its items.
    fn keys<'a, 'i>(&mut self, what: &str, t: &'a DeTable<'i>, known: &[&str]) -> Vec<Item<'a>> {
        let mut items = Vec::new();
        for (k, v) in t.iter() {
            if known.contains(&k.get_ref().as_ref()) {
                items.push((k, v));
            } else {
                self.problem(
                    k.span(),
                    format!(
                        "{what}: unknown key {:?} (known: {})",
                        k.get_ref().as_ref(),
                        known.join(", ")
                    ),
                );
            }
        }
        items
    }

    fn get<'a, 'i>(items: &[Item<'a>], key: &str) -> Option<&'a toml::Spanned<DeValue<'i>>>
    where
        'a: 'i,
    {
        items
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| *v)
    }

    fn string(&mut self, what: &str, v: &toml::Spanned<DeValue<'_>>) -> Option<String> {
        match v.get_ref() {
            DeValue::String(s) if s.len() <= 4096 => Some(s.to_string()),
            DeValue::String(_) => {
                self.problem(v.span(), format!("{what} is longer than 4096 characters"));
                None
            }
            _ => {
                self.problem(v.span(), format!("{what} must be a string"));
                None
            }
        }
    }

    fn required_string(
        &mut self,
        what: &str,
        items: &[Item<'_>],
        key: &str,
        span: Range<usize>,
    ) -> Option<String> {
        match Self::get(items, key) {
            Some(v) => self.string(&format!("{what}: {key}"), v),
            None => {
                self.problem(span, format!("{what}: {key} is missing"));
                None
            }
        }
    }

    fn path(&mut self, what: &str, v: &toml::Spanned<DeValue<'_>>) -> Option<PathBuf> {
        let s = self.string(what, v)?;
        if !s.starts_with('/') {
            self.problem(
                v.span(),
                format!("{what}: {s:?} must be an absolute path (jobs run from timers, whose working directory is /)"),
            );
            return None;
        }
        Some(PathBuf::from(s))
    }

    fn optional_path(&mut self, what: &str, items: &[Item<'_>], key: &str) -> Option<PathBuf> {
        Self::get(items, key).and_then(|v| self.path(&format!("{what}: {key}"), v))
    }

    fn bool(&mut self, what: &str, v: &toml::Spanned<DeValue<'_>>) -> Option<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.problem(v.span(), format!("{what} must be true or false"));
                None
            }
        }
    }

    fn integer(
        &mut self,
        what: &str,
        v: &toml::Spanned<DeValue<'_>>,
        range: std::ops::RangeInclusive<u64>,
    ) -> Option<u64> {
        let n = match v.get_ref() {
            DeValue::Integer(i) => {
                let radix = i.radix();
                u64::from_str_radix(&i.as_str().replace('_', ""), radix).ok()
            }
            _ => None,
        };
        match n {
            Some(n) if range.contains(&n) => Some(n),
            _ => {
                self.problem(
                    v.span(),
                    format!(
                        "{what} must be a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
        }
    }

    fn host(&mut self, name: &str, t: &DeTable<'_>, span: Range<usize>) -> Option<HostConf> {
        let what = format!("[host.{name}]");
        let items = self.keys(
            &what,
            t,
            &[
                "url",
                "user",
                "password_file",
                "ca_cert",
                "insecure_tls",
                "nbd_connections",
                "timeout",
            ],
        );
        let url = self.required_string(&what, &items, "url", span.clone());
        if let (Some(u), Some(v)) = (&url, Self::get(&items, "url"))
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            self.problem(
                v.span(),
                format!("{what}: url {u:?} must start with https:// (or http://)"),
            );
        }
        let user = match Self::get(&items, "user") {
            Some(v) => self.string(&format!("{what}: user"), v),
            None => Some("root".to_string()),
        };
        let password_file = match Self::get(&items, "password_file") {
            Some(v) => self.path(&format!("{what}: password_file"), v),
            None => {
                self.problem(
                    span.clone(),
                    format!("{what}: password_file is missing (the host's password is read from a file, never from the config itself)"),
                );
                None
            }
        };
        let ca_cert = self.optional_path(&what, &items, "ca_cert");
        let insecure_tls = match Self::get(&items, "insecure_tls") {
            Some(v) => self
                .bool(&format!("{what}: insecure_tls"), v)
                .unwrap_or(false),
            None => false,
        };
        let nbd_connections = match Self::get(&items, "nbd_connections") {
            Some(v) => self
                .integer(
                    &format!("{what}: nbd_connections"),
                    v,
                    1..=HOST_NBD_LIMIT as u64,
                )
                .map_or(HOST_NBD_LIMIT, |n| n as usize),
            None => HOST_NBD_LIMIT,
        };
        let timeout = match Self::get(&items, "timeout") {
            Some(v) => self
                .integer(&format!("{what}: timeout"), v, 1..=86_400)
                .unwrap_or(60),
            None => 60,
        };
        Some(HostConf {
            url: url?,
            user: user?,
            password_file: password_file?,
            ca_cert,
            insecure_tls,
            nbd_connections,
            timeout,
        })
    }

    fn repository(&mut self, name: &str, t: &DeTable<'_>, span: Range<usize>) -> Option<RepoConf> {
        let what = format!("[repository.{name}]");
        let items = self.keys(
            &what,
            t,
            &[
                "path",
                "password_file",
                "key_file",
                "s3_endpoint",
                "ca_cert",
            ],
        );
        let path = self.required_string(&what, &items, "path", span.clone());
        if let (Some(p), Some(v)) = (&path, Self::get(&items, "path")) {
            if p.starts_with("s3://") {
                if let Err(e) = crate::repo::store::s3::S3Url::parse(p) {
                    self.problem(v.span(), format!("{what}: path: {e}"));
                }
            } else if !p.starts_with('/') {
                self.problem(
                    v.span(),
                    format!("{what}: path {p:?} must be an absolute path or s3://BUCKET/PREFIX"),
                );
            }
        }
        let password_file = self.optional_path(&what, &items, "password_file");
        let key_file = self.optional_path(&what, &items, "key_file");
        if password_file.is_some() && key_file.is_some() {
            self.problem(
                span.clone(),
                format!("{what}: give password_file or key_file, not both"),
            );
        }
        let s3_endpoint = match Self::get(&items, "s3_endpoint") {
            Some(v) => self.string(&format!("{what}: s3_endpoint"), v),
            None => None,
        };
        let ca_cert = self.optional_path(&what, &items, "ca_cert");
        Some(RepoConf {
            path: path?,
            password_file,
            key_file,
            s3_endpoint,
            ca_cert,
        })
    }

    fn selectors(&mut self, what: &str, v: &toml::Spanned<DeValue<'_>>) -> Vec<Selector> {
        let DeValue::Array(a) = v.get_ref() else {
            self.problem(
                v.span(),
                format!("{what} must be a list of names, globs, \"tag:NAME\", \"pool:NAME\" or \"uuid:UUID\""),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in a.iter() {
            if let Some(s) = self.string(what, e) {
                match Selector::parse(&s) {
                    Ok(sel) => out.push(sel),
                    Err(m) => self.problem(e.span(), format!("{what}: {m}")),
                }
            }
        }
        out
    }

    fn keep(&mut self, what: &str, v: &toml::Spanned<DeValue<'_>>) -> crate::prune::Policy {
        let mut p = crate::prune::Policy::default();
        let Some(t) = self.table(what, v) else {
            return p;
        };
        let items = self.keys(
            what,
            t,
            &[
                "last", "hourly", "daily", "weekly", "monthly", "yearly", "within",
            ],
        );
        for (k, v) in items {
            let key = k.get_ref().as_ref();
            let w = format!("{what}: {key}");
            if key == "within" {
                if let Some(s) = self.string(&w, v) {
                    match crate::timefmt::parse_duration(&s) {
                        Ok(d) => p.within = Some(d),
                        Err(e) => self.problem(v.span(), format!("{w}: {e}")),
                    }
                }
                continue;
            }
            let Some(n) = self.integer(&w, v, 0..=100_000) else {
                continue;
            };
            let n = n as usize;
            match key {
                "last" => p.last = n,
                "hourly" => p.hourly = n,
                "daily" => p.daily = n,
                "weekly" => p.weekly = n,
                "monthly" => p.monthly = n,
                _ => p.yearly = n,
            }
        }
        if p.is_empty() {
            self.problem(
                v.span(),
                format!("{what} keeps nothing: give at least one of last, hourly, daily, weekly, monthly, yearly, within (or leave keep out to keep every point)"),
            );
        }
        p
    }

    fn notify(&mut self, what: &str, v: &toml::Spanned<DeValue<'_>>) -> NotifyConf {
        let mut n = NotifyConf::default();
        let Some(t) = self.table(what, v) else {
            return n;
        };
        let items = self.keys(
            what,
            t,
            &["webhook", "webhook_format", "mail", "sendmail", "when"],
        );
        for (k, v) in items {
            let key = k.get_ref().as_ref();
            let w = format!("{what}: {key}");
            match key {
                "webhook" => {
                    if let Some(u) = self.string(&w, v) {
                        if u.starts_with("https://") || u.starts_with("http://") {
                            n.webhook = Some(u);
                        } else {
                            self.problem(v.span(), format!("{w}: {u:?} is not an http(s) URL"));
                        }
                    }
                }
                "webhook_format" => match self.string(&w, v).as_deref() {
                    Some("json") => n.webhook_format = WebhookFormat::Json,
                    Some("slack") => n.webhook_format = WebhookFormat::Slack,
                    Some("teams") => n.webhook_format = WebhookFormat::Teams,
                    Some(other) => self.problem(
                        v.span(),
                        format!("{w}: {other:?} is not one of json, slack, teams"),
                    ),
                    None => {}
                },
                "mail" => {
                    let list: Vec<String> = match v.get_ref() {
                        DeValue::String(_) => self.string(&w, v).into_iter().collect(),
                        DeValue::Array(a) => a.iter().filter_map(|e| self.string(&w, e)).collect(),
                        _ => {
                            self.problem(
                                v.span(),
                                format!("{w} must be an address or a list of addresses"),
                            );
                            Vec::new()
                        }
                    };
                    for a in list {
                        // The address goes to sendmail's command line: nothing that could be
                        // read as an option or break the header.
                        let ok = a.contains('@')
                            && !a.starts_with('-')
                            && !a
                                .chars()
                                .any(|c| c.is_whitespace() || c.is_control() || c == ',');
                        if ok {
                            n.mail.push(a);
                        } else {
                            self.problem(v.span(), format!("{w}: {a:?} is not a mail address"));
                        }
                    }
                }
                "sendmail" => n.sendmail = self.path(&w, v),
                _ => match self.string(&w, v).as_deref() {
                    Some("failure") => n.when = NotifyWhen::Failure,
                    Some("always") => n.when = NotifyWhen::Always,
                    Some(other) => self.problem(
                        v.span(),
                        format!("{w}: {other:?} is not one of failure, always"),
                    ),
                    None => {}
                },
            }
        }
        n
    }

    fn job(
        &mut self,
        name: &str,
        t: &DeTable<'_>,
        span: Range<usize>,
        config: &Config,
    ) -> Option<JobConf> {
        let what = format!("[job.{name}]");
        let items = self.keys(
            &what,
            t,
            &[
                "host",
                "repository",
                "vms",
                "exclude",
                "concurrency",
                "connections",
                "schedule",
                "keep",
                "report",
                "metrics",
                "copy_to",
                "notify",
                "health",
            ],
        );
        let host = self.required_string(&what, &items, "host", span.clone());
        if let (Some(h), Some(v)) = (&host, Self::get(&items, "host"))
            && !config.hosts.contains_key(h)
        {
            self.problem(
                v.span(),
                format!("{what}: host {h:?} is not defined (add a [host.{h}] section)"),
            );
        }
        let repository = self.required_string(&what, &items, "repository", span.clone());
        if let (Some(r), Some(v)) = (&repository, Self::get(&items, "repository"))
            && !config.repositories.contains_key(r)
        {
            self.problem(
                v.span(),
                format!("{what}: repository {r:?} is not defined (add a [repository.{r}] section)"),
            );
        }
        let vms = match Self::get(&items, "vms") {
            Some(v) => {
                let s = self.selectors(&format!("{what}: vms"), v);
                if s.is_empty() {
                    self.problem(
                        v.span(),
                        format!("{what}: vms selects nothing; \"*\" takes every VM"),
                    );
                }
                s
            }
            None => {
                self.problem(
                    span.clone(),
                    format!("{what}: vms is missing (\"*\" takes every VM of the pool)"),
                );
                Vec::new()
            }
        };
        let exclude = match Self::get(&items, "exclude") {
            Some(v) => self.selectors(&format!("{what}: exclude"), v),
            None => Vec::new(),
        };
        let concurrency = match Self::get(&items, "concurrency") {
            Some(v) => self
                .integer(
                    &format!("{what}: concurrency"),
                    v,
                    1..=HOST_NBD_LIMIT as u64,
                )
                .map_or(2, |n| n as usize),
            None => 2,
        };
        let connections = match Self::get(&items, "connections") {
            Some(v) => self
                .integer(
                    &format!("{what}: connections"),
                    v,
                    1..=HOST_NBD_LIMIT as u64,
                )
                .map_or(4, |n| n as usize),
            None => 4,
        };
        let schedule = match Self::get(&items, "schedule") {
            Some(v) => {
                let s = self.string(&format!("{what}: schedule"), v);
                if let Some(s) = &s
                    && let Err(e) = schedule::check(s)
                {
                    self.problem(v.span(), format!("{what}: schedule {s:?}: {e}"));
                }
                s
            }
            None => None,
        };
        let keep = match Self::get(&items, "keep") {
            Some(v) => self.keep(&format!("{what}: keep"), v),
            None => crate::prune::Policy::default(),
        };
        let report = self.optional_path(&what, &items, "report");
        let metrics = self.optional_path(&what, &items, "metrics");
        let copy_to = match Self::get(&items, "copy_to") {
            Some(v) => {
                let c = self.string(&format!("{what}: copy_to"), v);
                if let Some(c) = &c {
                    if !config.repositories.contains_key(c) {
                        self.problem(
                            v.span(),
                            format!("{what}: copy_to {c:?} is not a defined repository (add a [repository.{c}] section)"),
                        );
                    } else if Some(c) == repository.as_ref() {
                        self.problem(
                            v.span(),
                            format!("{what}: copy_to names the job's own repository; an offsite copy goes to another one"),
                        );
                    }
                }
                c
            }
            None => None,
        };
        let notify = match Self::get(&items, "notify") {
            Some(v) => self.notify(&format!("{what}: notify"), v),
            None => NotifyConf::default(),
        };
        let health = match Self::get(&items, "health") {
            Some(v) => match self.string(&format!("{what}: health"), v).as_deref() {
                Some("fsck") => Some(Health::Fsck),
                Some("none") => None,
                Some(other) => {
                    self.problem(
                        v.span(),
                        format!("{what}: health {other:?} is not one of fsck, none"),
                    );
                    None
                }
                None => None,
            },
            None => None,
        };
        Some(JobConf {
            host: host?,
            repository: repository?,
            vms,
            exclude,
            concurrency,
            connections,
            schedule,
            keep,
            report,
            metrics,
            copy_to,
            notify,
            health,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The issue's example, as written.
    pub const EXAMPLE: &str = r#"
[host.xs1]
url = "https://xs1.example"
user = "root"
password_file = "/etc/cbtfs/xs1.password"

[repository.main]
path = "/backup/repo"            # later also "s3://bucket/prefix"
password_file = "/etc/cbtfs/repo.password"

[job.nightly]
host = "xs1"
repository = "main"
vms = ["*"]                      # names or globs; "tag:NAME" selects by tag
exclude = ["test-*"]
concurrency = 4
schedule = "*-*-* 02:00:00"      # systemd OnCalendar
keep = { last = 7, daily = 14, weekly = 8, monthly = 12 }
report = "/var/log/cbtfs/nightly.json"
metrics = "/var/lib/prometheus/node-exporter/cbtfs.prom"
"#;

    fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        Config::parse(text, Path::new("/etc/cbtfs/cbtfs.toml")).map_err(|e| match e {
            ConfigError::Invalid { problems, .. } => problems,
            other => panic!("{other}"),
        })
    }

    #[test]
    fn the_issues_example_reads_as_written() {
        let c = parse(EXAMPLE).unwrap();
        let j = c.job("nightly").unwrap();
        assert_eq!(j.host, "xs1");
        assert_eq!(j.repository, "main");
        assert_eq!(j.vms, [Selector::Name("*".into())]);
        assert_eq!(j.exclude, [Selector::Name("test-*".into())]);
        assert_eq!(j.concurrency, 4);
        assert_eq!(j.schedule.as_deref(), Some("*-*-* 02:00:00"));
        assert_eq!(
            (j.keep.last, j.keep.daily, j.keep.weekly, j.keep.monthly),
            (7, 14, 8, 12)
        );
        assert_eq!(
            j.report.as_deref(),
            Some(Path::new("/var/log/cbtfs/nightly.json"))
        );
        let h = &c.hosts["xs1"];
        assert_eq!(
            (h.url.as_str(), h.user.as_str()),
            ("https://xs1.example", "root")
        );
        assert_eq!(h.nbd_connections, 16);
        assert_eq!(c.repositories["main"].path, "/backup/repo");
    }

    #[test]
    fn every_problem_is_named_with_its_line() {
        let text = r#"
[host.xs1]
url = "ftp://xs1"
pasword_file = "/x"

[repository.main]
path = "relative/repo"

[job.nightly]
host = "xs2"
repository = "main"
vms = ["*", "uuid:nope", "tag:"]
concurrency = 99
schedule = "*-*-* 25:00:00"
keep = { last = 0, dayly = 3 }
copy_to = "main"
notify = { mail = ["-oQ/tmp"], when = "sometimes" }
"#;
        let problems = parse(text).unwrap_err();
        let lines: Vec<(usize, &str)> = problems
            .iter()
            .map(|p| (p.line, p.message.as_str()))
            .collect();
        let has = |line: usize, needle: &str| {
            assert!(
                lines.iter().any(|(l, m)| *l == line && m.contains(needle)),
                "no problem at line {line} saying {needle:?}: {lines:#?}"
            )
        };
        has(3, "must start with https://");
        has(4, "unknown key \"pasword_file\"");
        has(2, "password_file is missing");
        has(7, "must be an absolute path");
        has(10, "host \"xs2\" is not defined");
        has(12, "\"nope\" is not a uuid");
        has(12, "selects nothing");
        has(13, "from 1 to 16");
        has(14, "schedule");
        has(15, "unknown key \"dayly\"");
        has(15, "keeps nothing");
        has(16, "the job's own repository");
        has(17, "is not a mail address");
        has(17, "not one of failure, always");
    }

    #[test]
    fn syntax_errors_have_lines_too() {
        let problems = parse("[host.a]\nurl = \"https://a\"\npassword_file = \n").unwrap_err();
        assert!(problems.iter().any(|p| p.line == 3), "{problems:?}");
        let problems = parse("[job.x\n").unwrap_err();
        assert!(problems.iter().any(|p| p.line == 1), "{problems:?}");
    }

    #[test]
    fn unknown_sections_and_bad_names_are_refused() {
        let problems = parse("[hosts.a]\nurl = \"https://a\"\n").unwrap_err();
        assert!(problems[0].message.contains("unknown section [hosts]"));
        let problems =
            parse("[host.\"a b\"]\nurl = \"https://a\"\npassword_file = \"/p\"\n").unwrap_err();
        assert!(problems[0].message.contains("a name is"), "{problems:?}");
    }

    #[test]
    fn globs_and_selectors_match() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("test-*", "test-db"));
        assert!(!glob_match("test-*", "prod-db"));
        assert!(glob_match("web-?", "web-1"));
        assert!(!glob_match("web-?", "web-10"));
        assert!(glob_match("*-db-*", "eu-db-1"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        // No exponential blow-up on hostile patterns.
        let name = "a".repeat(2000);
        let pattern = format!("{}b", "*a".repeat(200));
        assert!(!glob_match(&pattern, &name));
        let tags = vec!["prod".to_string()];
        let vm = VmFacts {
            name: "db1",
            uuid: "0f0f0f0f-0000-4000-8000-000000000001",
            tags: &tags,
            pool: "pool-a",
        };
        assert!(Selector::parse("tag:prod").unwrap().matches(&vm));
        assert!(!Selector::parse("tag:test").unwrap().matches(&vm));
        assert!(Selector::parse("pool:pool-*").unwrap().matches(&vm));
        assert!(
            Selector::parse("uuid:0F0F0F0F-0000-4000-8000-000000000001")
                .unwrap()
                .matches(&vm)
        );
        assert!(Selector::parse("db?").unwrap().matches(&vm));
    }
}
