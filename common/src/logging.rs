//! Log set-up shared by the daemons: `tracing` to stderr, journal-aware.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Sets up `tracing` to stderr with `filter`. Under systemd (stderr is the journal, as
/// `$JOURNAL_STREAM` says) lines carry no timestamp (the journal adds its own) and start
/// with their syslog priority (`<4>` for a warning, `<3>` for an error: [`Prioritized`]), so
/// `journalctl -p warning` finds them. Colours only on a terminal.
pub fn init_logging(filter: &str) {
    use std::io::IsTerminal as _;
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    if journal {
        builder
            .event_format(Prioritized(format().without_time()))
            .init();
    } else {
        builder.init();
    }
}

fn format() -> format::Format {
    format::Format::default()
}

/// An event format that starts each event with its syslog priority as systemd reads it on
/// a service's stdout and stderr (`SyslogLevelPrefix=`, on by default): ERROR is `err`
/// (3), WARN `warning` (4), INFO `info` (6), DEBUG and TRACE `debug` (7).
pub struct Prioritized<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The syslog priority of a `tracing` level.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// True when stderr is the stream systemd connected to the journal (`$JOURNAL_STREAM` is
/// `DEVICE:INODE` of that stream; a child whose stderr was redirected does not match).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_lines_start_with_their_syslog_priority() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(Level::DEBUG)
            .event_format(Prioritized(format().without_time()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("disk full");
            tracing::warn!(agent_id = "a-1", "Agent lost.");
            tracing::info!("Agent online.");
            tracing::debug!("detail");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("<3>") && lines[0].contains("disk full"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("<4>") && lines[1].contains("agent_id"),
            "{text}"
        );
        assert!(lines[2].starts_with("<6>"), "{text}");
        assert!(lines[3].starts_with("<7>"), "{text}");
    }
}
