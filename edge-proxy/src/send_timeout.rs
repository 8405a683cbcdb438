//! A client connection whose writes give up on a client that stops reading.
//!
//! Without it, a client that asks for a large response and reads none of it holds its
//! connection, the upstream connection behind it and their buffers for as long as it likes,
//! on either path. As nginx's `send_timeout`, the time runs only while a write waits for the
//! client and starts again whenever the client takes some bytes; writes that do not wait, nearly
//! all of them, arm no timer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `stream`, whose writes fail with [`io::ErrorKind::TimedOut`] once one has waited `timeout`
/// for the client.
pub struct SendTimeout<S> {
    stream: S,
    timeout: Duration,
    /// Runs while a write waits; allocated the first time one does.
    stalled: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl<S> SendTimeout<S> {
    /// `stream` with writes limited to `timeout` of waiting.
    pub fn new(stream: S, timeout: Duration) -> Self {
        Self { stream, timeout, stalled: None, waiting: false }
    }

    /// What a write of the inner stream returned, or the timeout's error once its wait has
    /// lasted too long.
    fn timed<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        if !self.waiting {
            self.waiting = true;
            let deadline = Instant::now() + self.timeout;
            match &mut self.stalled {
                Some(stalled) => stalled.as_mut().reset(deadline),
                None => self.stalled = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match self.stalled.as_mut().map(|stalled| stalled.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")))
            }
            _ => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.timed(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.timed(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.timed(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_reader_never_takes_fails_after_the_timeout_and_one_it_takes_does_not() {
        let (near, mut far) = tokio::io::duplex(16);
        let mut stream = SendTimeout::new(near, Duration::from_secs(5));
        stream.write_all(&[1; 16]).await.expect("fits the pipe without waiting");

        // The reader takes the bytes while the next write waits: no timeout.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let mut buf = [0; 32];
            far.read_exact(&mut buf).await.unwrap();
            far
        });
        stream.write_all(&[2; 16]).await.expect("the reader took the first bytes in time");
        stream.write_all(&[3; 16]).await.expect("and the next ones");
        let _far = reader.await.unwrap();

        // Now nobody reads: the write gives up (the paused clock jumps to the deadline).
        let err = stream.write_all(&[4; 16]).await.expect_err("nobody reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
