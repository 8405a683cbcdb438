//! A TCP forwarder in front of the operator's replicas, standing in for a Kubernetes Service
//! and kube-proxy: no node runs here, so nothing else would route agents by readiness. Each new
//! connection goes to the gateway of a replica whose `/readyz` answers 200 (the leader), and is
//! closed at once when none does, as a Service without ready endpoints refuses; a connection
//! whose replica dies is closed, so its agent reconnects and is routed again.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// One replica: its ops port (asked for `/readyz`) and its gateway port (forwarded to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// `/readyz` is asked here.
    pub ops_port: u16,
    /// Connections go here.
    pub gateway_port: u16,
}

/// The forwarder, listening on 127.0.0.1 until the test process ends.
pub struct Forwarder {
    /// Where it listens.
    pub port: u16,
    backends: Arc<Mutex<Vec<Backend>>>,
    forwarded: Arc<Mutex<BTreeMap<u16, usize>>>,
}

impl Forwarder {
    /// Listens on `port` (the port agents and the registry's token realm are given).
    pub fn start(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("the forwarder's port is free");
        let backends = Arc::new(Mutex::new(Vec::<Backend>::new()));
        let forwarded = Arc::new(Mutex::new(BTreeMap::new()));
        let (b, f) = (Arc::clone(&backends), Arc::clone(&forwarded));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let candidates = b.lock().unwrap().clone();
                let forwarded = Arc::clone(&f);
                std::thread::spawn(move || forward(client, &candidates, &forwarded));
            }
        });
        Self { port, backends, forwarded }
    }

    /// Adds a replica.
    pub fn add(&self, backend: Backend) {
        self.backends.lock().unwrap().push(backend);
    }

    /// How many connections went to the gateway on `gateway_port`.
    pub fn forwarded_to(&self, gateway_port: u16) -> usize {
        self.forwarded.lock().unwrap().get(&gateway_port).copied().unwrap_or(0)
    }
}

fn forward(client: TcpStream, candidates: &[Backend], forwarded: &Mutex<BTreeMap<u16, usize>>) {
    let ready = candidates.iter().find(|backend| {
        crate::agent_support::http_get(backend.ops_port, "/readyz").is_some_and(|(status, _)| status == 200)
    });
    let Some(backend) = ready else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", backend.gateway_port)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    *forwarded.lock().unwrap().entry(backend.gateway_port).or_default() += 1;
    let (Ok(client_in), Ok(upstream_out)) = (client.try_clone(), upstream.try_clone()) else { return };
    let up = std::thread::spawn(move || pipe(client_in, upstream_out));
    pipe(upstream, client);
    let _ = up.join();
}

/// Copies `from` to `to` until either side ends, then closes both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
