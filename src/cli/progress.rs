//! Progress on stderr for every step that can take more than a second. indicatif draws only
//! when stderr is a terminal, so logs and pipes stay clean.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

/// A bar over `total` items (`images`, `tensors`), with a leading `what`.
pub fn bar(total: usize, what: &str, items: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {items}, eta {{eta}}"
        ))
        .expect("valid template"),
    );
    bar
}

/// A spinner for a step whose length is not known in advance.
pub fn spinner(message: impl Into<String>) -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(message.into());
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}
