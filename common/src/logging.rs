//! Log set-up shared by the daemons: `tracing` to stderr, journal-aware.

/// Sets up `tracing` to stderr with `filter`. Under systemd (stderr is the journal, as
/// `$JOURNAL_STREAM` says) lines carry no timestamp: the journal adds its own. Colours only
/// on a terminal.
pub fn init_logging(filter: &str) {
    use std::io::IsTerminal as _;
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    if journal {
        builder.without_time().init();
    } else {
        builder.init();
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
