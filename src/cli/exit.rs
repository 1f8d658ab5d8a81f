//! What the exit status says, as the README promises: 0 success, 1 a runtime error (a file,
//! the data, the machine), 2 a usage error (a value or a combination of flags that cannot
//! work, found before any work starts), 130 a training run stopped by Ctrl-C (resumable).
//! Every error is one `error: ` line on stderr (a recipe's problems, one line each).

use std::fmt;
use std::process::ExitCode;

/// A usage error found after clap's parse: flags that do not go together, a missing or
/// unknown `--arch`. Exit status 2, like clap's own.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// `bail!` for usage errors (exit status 2).
macro_rules! usage {
    ($($message:tt)*) => {
        return Err(anyhow::Error::new($crate::cli::exit::UsageError(format!($($message)*))))
    };
}
pub(crate) use usage;

/// Turns any error into a usage error, keeping its message (the configuration checks of the
/// library, which know nothing of exit codes).
pub fn as_usage(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(UsageError(format!("{e:#}")))
}

/// A training run stopped by Ctrl-C after saving its state (exit status 130); how to resume
/// is printed already, or given as context around this marker.
#[derive(Debug)]
pub struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Prints `e` and returns the exit status it stands for.
pub fn report(e: &anyhow::Error) -> ExitCode {
    // A recipe's problems are usage errors: all of them, one per line.
    if let Some(problems) = e.downcast_ref::<slimcandle::pipeline::Problems>() {
        for line in problems.lines() {
            eprintln!("error: {line}");
        }
        eprintln!(
            "{} problem(s) in the recipe; nothing was run",
            problems.lines().len()
        );
        return ExitCode::from(2);
    }
    if e.downcast_ref::<Interrupted>().is_some() {
        // What was stopped and how to continue is printed already, or is the context around
        // the marker (a recipe's training stage).
        if e.chain().count() > 1 {
            eprintln!("error: {e}");
        }
        return ExitCode::from(130);
    }
    eprintln!("error: {}", one_line(e));
    if e.downcast_ref::<UsageError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

/// The error and its causes on one line, leaving out a cause whose text the line already
/// holds (a message that quotes the error it wraps).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        let inner = anyhow::anyhow!("No such file or directory");
        let e = Err::<(), _>(inner)
            .context("cannot read `x`: No such file or directory")
            .unwrap_err();
        assert_eq!(one_line(&e), "cannot read `x`: No such file or directory");
        let e = Err::<(), _>(anyhow::anyhow!("disk full"))
            .context("cannot write `y`")
            .unwrap_err();
        assert_eq!(one_line(&e), "cannot write `y`: disk full");
    }
}
