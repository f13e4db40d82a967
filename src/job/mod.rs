//! Backup jobs for a whole pool: a configuration file of hosts, repositories and jobs
//! ([`config`]), the schedules that timers run them on ([`schedule`]), and the record of a
//! run ([`report`]).

pub mod config;
pub mod deliver;
pub mod report;
pub mod run;
pub mod schedule;

pub use config::{Config, ConfigError, JobConf, Selector};
