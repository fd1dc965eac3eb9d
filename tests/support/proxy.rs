//! A TCP forwarder that a test can cut and heal: a real network partition between one node
//! and Redis, while the other nodes keep talking to the same server.
//!
//! `cut` closes every forwarded connection and makes new ones close at once (the client sees
//! a reset, like a dropped link); `heal` lets connections through again. `set_delay` holds
//! every forwarded chunk that long, each way (a slow link: a round trip gains twice it).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Forwards `127.0.0.1:<port>` to an upstream loopback port.
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every live forwarded connection, to shut them down on `cut`.
    live: Mutex<Vec<TcpStream>>,
    /// Microseconds each forwarded chunk is held, each way.
    delay_us: AtomicU64,
}

impl Proxy {
    pub fn start(upstream: u16) -> io::Result<Proxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
            delay_us: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if s.cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let pipes = (client.try_clone(), server.try_clone());
                let (Ok(c2), Ok(s2)) = pipes else { continue };
                {
                    let mut live = s.live.lock().unwrap_or_else(|p| p.into_inner());
                    if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                        live.push(a);
                        live.push(b);
                    }
                }
                let (d1, d2) = (Arc::clone(&s), Arc::clone(&s));
                std::thread::spawn(move || pump(client, s2, &d1));
                std::thread::spawn(move || pump(server, c2, &d2));
            }
        });
        Ok(Proxy {
            port,
            shared,
            accept: Some(accept),
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Partition: drop every connection and refuse new ones.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        let mut live = self.shared.live.lock().unwrap_or_else(|p| p.into_inner());
        for s in live.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Whether the proxy is cut.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// End of the partition.
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Holds every forwarded chunk `delay` before passing it on, each way.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.shared.delay_us.store(
            u64::try_from(delay.as_micros()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let delay = shared.delay_us.load(Ordering::Relaxed);
                if delay > 0 {
                    // A slow link, not a condition to await: the delay is the point.
                    std::thread::sleep(std::time::Duration::from_micros(delay));
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
