//! Blob transfers that broke, said in words: both the agent (downloads) and the CLI
//! (uploads) retry what another try may fix and tell the user what happened, instead of a
//! raw `transport error` or `h2 protocol error`.

/// A failed transfer, said in words, and whether another try may help.
#[derive(Debug)]
pub struct TransferFailure {
    pub words: String,
    pub transient: bool,
}

impl std::fmt::Display for TransferFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.words)
    }
}

impl std::error::Error for TransferFailure {}

/// What a gRPC status means for a transfer, in words a user can act on, with the raw
/// status after them for whoever digs further.
pub fn failure(status: &tonic::Status) -> TransferFailure {
    use tonic::Code;
    let raw = status.message().to_ascii_lowercase();
    let broke = [
        "transport",
        "h2",
        "connection",
        "reset",
        "broken pipe",
        "stream",
        "eof",
    ]
    .iter()
    .any(|word| raw.contains(word));
    let (words, transient) = match status.code() {
        Code::Unavailable => (
            "the coordinator could not be reached (restarting, or the network is down)",
            true,
        ),
        Code::DeadlineExceeded => ("the coordinator did not answer in time", true),
        Code::Cancelled | Code::Unknown | Code::Internal | Code::Aborted if broke => {
            ("the connection to the coordinator broke", true)
        }
        Code::Cancelled | Code::Unknown | Code::Internal | Code::Aborted => {
            ("the coordinator ended the transfer", true)
        }
        Code::NotFound => ("the coordinator does not have it", false),
        Code::PermissionDenied | Code::Unauthenticated => ("the coordinator refused it", false),
        _ => ("the coordinator refused it", false),
    };
    TransferFailure {
        words: format!("{words} ({:?}: {})", status.code(), status.message()),
        transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_connections_are_worth_another_try_and_refusals_are_not() {
        let broke = failure(&tonic::Status::unknown(
            "h2 protocol error: error reading a body",
        ));
        assert!(broke.transient);
        assert!(
            broke
                .words
                .starts_with("the connection to the coordinator broke"),
            "{}",
            broke.words
        );
        assert!(failure(&tonic::Status::unavailable("tcp connect error")).transient);
        let refused = failure(&tonic::Status::invalid_argument("blob over the limit"));
        assert!(!refused.transient);
        assert!(refused.words.contains("blob over the limit"));
        assert!(!failure(&tonic::Status::not_found("no such blob")).transient);
    }
}
