//! Every tracing line the operator writes in a test binary, kept so a test can check that no
//! secret is among them.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(Arc::clone(&logs));
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("stagely_operator=trace,kube=info"))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        logs
    })
}

/// Starts capturing (once per test binary; later calls do nothing).
pub fn capture() {
    buffer();
}

/// Everything captured so far.
pub fn text() -> String {
    String::from_utf8_lossy(&buffer().lock().unwrap()).into_owned()
}
