//! A real DNS server for tests and benchmarks: Debian's dnsmasq on 127.0.0.1 and a free port,
//! authoritative (`local=`) for a test domain, serving the PTR, SRV and TXT records it is given.
//! Restarting it on the same port with new records is how a zone change is simulated (dnsmasq
//! reads `ptr-record`, `srv-host` and `txt-record` only at start). The process is killed and its
//! directory removed on drop.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// One published cluster instance.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The instance label (`rome` in `rome._liqo._tcp.<domain>`).
    pub label: String,
    /// SRV records: (priority, weight, port, target).
    pub srv: Vec<(u16, u16, u16, String)>,
    /// TXT strings (`key=value` each); `None` for no TXT record.
    pub txt: Option<Vec<String>>,
}

impl Instance {
    pub fn new(label: &str) -> Self {
        Self {
            label: label.into(),
            srv: vec![],
            txt: None,
        }
    }

    pub fn srv(mut self, priority: u16, weight: u16, port: u16, target: &str) -> Self {
        self.srv.push((priority, weight, port, target.into()));
        self
    }

    pub fn txt(mut self, entries: &[&str]) -> Self {
        self.txt = Some(entries.iter().map(|s| s.to_string()).collect());
        self
    }
}

pub struct Dnsmasq {
    child: Option<Child>,
    pub port: u16,
    pub domain: String,
    ttl: u32,
    dir: PathBuf,
}

fn free_port() -> u16 {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port for dnsmasq");
}

impl Dnsmasq {
    /// Starts dnsmasq serving `instances` under `domain` with records of `ttl` seconds.
    pub fn start(domain: &str, ttl: u32, instances: &[Instance]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "liqo-discovery-dns-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = Self {
            child: None,
            port: free_port(),
            domain: domain.into(),
            ttl,
            dir,
        };
        d.spawn(instances);
        d
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The configuration file, and the TXT records as command-line options (dnsmasq's config
    /// file lines are limited to about 1 kB; the command line is not).
    fn config(&self, instances: &[Instance]) -> (String, Vec<String>) {
        let mut args = vec![];
        let service = format!("_liqo._tcp.{}", self.domain);
        let mut c = format!(
            "port={}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n\
             no-negcache\nlocal=/{}/\nlocal-ttl={}\nauth-ttl={}\npid-file=\nuser=root\n",
            self.port, self.domain, self.ttl, self.ttl
        );
        for i in instances {
            let name = format!("{}.{service}", i.label);
            c.push_str(&format!("ptr-record={service},{name}\n"));
            for (p, w, port, target) in &i.srv {
                c.push_str(&format!("srv-host={name},{target},{port},{p},{w}\n"));
            }
            if let Some(txt) = &i.txt {
                // No shell and no config-file quoting on the command line: strings go as they
                // are (the tests' strings hold no commas).
                let strings: Vec<&str> = txt.iter().map(String::as_str).collect();
                args.push(format!("--txt-record={name},{}", strings.join(",")));
            }
        }
        (c, args)
    }

    fn spawn(&mut self, instances: &[Instance]) {
        let conf = self.dir.join("dnsmasq.conf");
        let (text, txt_args) = self.config(instances);
        std::fs::write(&conf, text).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = Command::new("setpriv")
                .args([
                    "--pdeathsig",
                    "KILL",
                    "--",
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--log-facility=-",
                ])
                .arg(format!("--conf-file={}", conf.display()))
                .args(&txt_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("dnsmasq (Debian package dnsmasq-base) must be installed");
            let stderr = child.stderr.take().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let mut log = vec![];
            let ready = loop {
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(line) if line.contains("started, version") => break true,
                    Ok(line) => log.push(line),
                    Err(_) => break false,
                }
            };
            if ready {
                // Keep draining its log so it never blocks on a full pipe.
                std::thread::spawn(move || while rx.recv().is_ok() {});
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            // The port can still be held for a moment by the previous instance.
            if Instant::now() > deadline {
                panic!("dnsmasq did not start: {log:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (the port goes silent).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Serves `instances` instead, on the same port.
    pub fn restart(&mut self, instances: &[Instance]) {
        self.stop();
        self.spawn(instances);
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
