//! Backup jobs for a whole pool: a configuration file of hosts, repositories and jobs
//! ([`config`]), the schedules that timers run them on ([`schedule`]), and the record of a
//! run ([`report`]) and where it goes: report file, metrics, notifications, summary
//! ([`deliver`]), and the systemd units that run them ([`units`]).

pub mod config;
pub mod deliver;
pub mod report;
pub mod run;
pub mod schedule;
pub mod units;

pub use config::{Config, ConfigError, JobConf, Selector};
