//! Backup jobs for a whole pool: a configuration file of hosts, repositories and jobs
//! ([`config`]), and the schedules that timers run them on ([`schedule`]).

pub mod config;
pub mod schedule;

pub use config::{Config, ConfigError, JobConf, Selector};
