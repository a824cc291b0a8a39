//! Kiln's shared vocabulary: target names, run states and the snapshot format.
//! Nothing here does network I/O; the snapshot code does file I/O only on the paths it is given.
//! `logging` sets up the daemons' `tracing` output.

pub mod config_file;
pub mod dirlock;
pub mod logging;
pub mod private;
pub mod run;
pub mod snapshot;
pub mod target;

/// The version every Kiln binary reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
