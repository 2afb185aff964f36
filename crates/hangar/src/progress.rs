//! Transfer progress bars, drawn only when stdout is a terminal.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use hangar_oci::client::{NoProgress, Progress};
use hangar_oci::Digest;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
}

impl Bars {
    fn bar(&self, digest: &Digest, size: u64) -> ProgressBar {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        bars.entry(digest.clone())
            .or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(size));
                let style =
                    ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(digest.short().to_string());
                bar
            })
            .clone()
    }
}

impl Progress for Bars {
    fn start(&self, digest: &Digest, size: u64) {
        self.bar(digest, size);
    }
    fn advance(&self, digest: &Digest, bytes: u64) {
        self.bar(digest, 0).inc(bytes);
    }
    fn finish(&self, digest: &Digest, how: &str) {
        let bar = self.bar(digest, 0);
        bar.finish_with_message(how.to_string());
    }
}

/// Bars on a terminal, nothing otherwise.
pub fn for_stdout() -> Arc<dyn Progress> {
    if std::io::stdout().is_terminal() {
        Arc::new(Bars {
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
        })
    } else {
        Arc::new(NoProgress)
    }
}
