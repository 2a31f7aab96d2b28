//! Port reservations shared by every lab on the machine.
//!
//! A port is reserved by a file `<dir>/<port>` (default dir: `std::env::temp_dir()/liqo-lab-ports`)
//! that holds the [`ProcessToken`] of its owner. A reservation whose owner is gone is stale and may
//! be taken over. All changes happen under an exclusive lock on `<dir>/.lock`, so two labs (in two
//! test binaries, say) never pick the same port; a candidate must also be bindable on 127.0.0.1.
//! Ports come from 20000..=31999, below Linux's ephemeral range (32768..).

use std::{
    fs::{self, File, OpenOptions},
    hash::{BuildHasher, Hasher},
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
};

use crate::{
    error::{LabError, Result},
    procfs::ProcessToken,
};

/// First port the lab uses.
pub const FIRST_PORT: u16 = 20000;
/// Last port the lab uses.
pub const LAST_PORT: u16 = 31999;

/// The directory of reservation files and the range ports are taken from.
#[derive(Debug, Clone)]
pub(crate) struct PortRegistry {
    dir: PathBuf,
    first: u16,
    last: u16,
}

impl PortRegistry {
    /// The machine-wide registry.
    pub(crate) fn system() -> Self {
        Self::new(
            std::env::temp_dir().join("liqo-lab-ports"),
            FIRST_PORT,
            LAST_PORT,
        )
    }

    pub(crate) fn new(dir: PathBuf, first: u16, last: u16) -> Self {
        Self { dir, first, last }
    }

    /// Reserves `count` distinct free ports for `owner`.
    pub(crate) fn reserve_many(
        &self,
        count: usize,
        owner: ProcessToken,
    ) -> Result<Vec<PortReservation>> {
        let _lock = self.lock()?;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(self.reserve_locked(owner)?);
        }
        Ok(out)
    }

    fn lock(&self) -> Result<File> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| LabError::io("creating the port reservation directory", &self.dir, e))?;
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LabError::io("opening", &path, e))?;
        file.lock().map_err(|e| LabError::io("locking", &path, e))?;
        Ok(file)
    }

    fn reserve_locked(&self, owner: ProcessToken) -> Result<PortReservation> {
        let span = u32::from(self.last - self.first) + 1;
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let offset = u32::try_from(hasher.finish() % u64::from(span)).unwrap_or(0);
        for i in 0..span {
            let Ok(port) = u16::try_from(u32::from(self.first) + (offset + i) % span) else {
                continue;
            };
            let path = self.dir.join(port.to_string());
            match fs::read_to_string(&path) {
                Ok(content) => {
                    let live = content
                        .trim()
                        .parse::<ProcessToken>()
                        .is_ok_and(|t| t.is_alive());
                    if live {
                        continue;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => continue,
            }
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            // Stale or absent: (re)create it as ours. We hold the lock, so nobody races us.
            let _ = fs::remove_file(&path);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| LabError::io("creating the port reservation", &path, e))?;
            let token = owner.to_string();
            file.write_all(token.as_bytes())
                .map_err(|e| LabError::io("writing the port reservation", &path, e))?;
            return Ok(PortReservation {
                port,
                path,
                token,
                keep: false,
            });
        }
        Err(LabError::NoFreePort {
            first: self.first,
            last: self.last,
            dir: self.dir.clone(),
        })
    }
}

/// One reserved port. Dropping it releases the reservation (unless it was
/// [persisted](PortReservation::persist)).
#[derive(Debug)]
pub(crate) struct PortReservation {
    port: u16,
    path: PathBuf,
    token: String,
    keep: bool,
}

impl PortReservation {
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The owner token written in the reservation file.
    #[cfg(test)]
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// Makes `owner` the holder of the reservation (used by detached labs, whose ports must stay
    /// reserved after the starting process exits).
    pub(crate) fn transfer(&mut self, owner: ProcessToken) -> Result<()> {
        let token = owner.to_string();
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, &token).map_err(|e| LabError::io("writing", &tmp, e))?;
        fs::rename(&tmp, &self.path).map_err(|e| LabError::io("replacing", &self.path, e))?;
        self.token = token;
        Ok(())
    }

    /// Keeps the reservation file when this value is dropped.
    pub(crate) fn persist(mut self) {
        self.keep = true;
    }

    /// Removes the reservation file if it still holds our token.
    pub(crate) fn release(mut self) {
        self.release_now();
    }

    fn release_now(&mut self) {
        self.keep = true;
        release_file(&self.path, &self.token);
    }
}

impl Drop for PortReservation {
    fn drop(&mut self) {
        if !self.keep {
            self.release_now();
        }
    }
}

/// Removes a reservation file if it holds `token`.
pub(crate) fn release_file(path: &Path, token: &str) {
    if fs::read_to_string(path).is_ok_and(|c| c.trim() == token.trim()) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("liqo-lab-ports-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn reservations_never_share_a_port() {
        let dir = scratch("unique");
        let reg = PortRegistry::new(dir.clone(), 24000, 24999);
        let me = ProcessToken::current();
        let a = reg.reserve_many(40, me).expect("reserve");
        let b = reg.reserve_many(40, me).expect("reserve");
        let ports: HashSet<u16> = a.iter().chain(&b).map(PortReservation::port).collect();
        assert_eq!(ports.len(), 80);
        for r in a.iter().chain(&b) {
            assert!((24000..=24999).contains(&r.port()));
            assert_eq!(fs::read_to_string(r.path()).expect("file"), me.to_string());
        }
        // Concurrent reservations from several threads stay distinct too.
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let reg = reg.clone();
                std::thread::spawn(move || reg.reserve_many(25, me).expect("reserve"))
            })
            .collect();
        let mut all = ports;
        let mut held = Vec::new();
        for h in handles {
            for r in h.join().expect("thread") {
                assert!(all.insert(r.port()), "port {} handed out twice", r.port());
                held.push(r);
            }
        }
        let paths: Vec<PathBuf> = a.iter().map(|r| r.path().to_owned()).collect();
        drop(a);
        assert!(paths.iter().all(|p| !p.exists()), "dropping releases");
        drop((b, held));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_reservations_are_taken_over_live_ones_are_not() {
        let dir = scratch("stale");
        fs::create_dir_all(&dir).expect("dir");
        let reg = PortRegistry::new(dir.clone(), 24500, 24500);
        let dead = ProcessToken {
            pid: u32::MAX - 7,
            start_time: 42,
        };
        fs::write(dir.join("24500"), dead.to_string()).expect("write");
        let me = ProcessToken::current();
        let r = reg
            .reserve_many(1, me)
            .expect("stale reservation taken over");
        assert_eq!(r[0].port(), 24500);
        assert_eq!(
            fs::read_to_string(dir.join("24500")).expect("file"),
            me.to_string()
        );
        // Now it is live (ours): a second reservation must fail.
        assert!(matches!(
            reg.reserve_many(1, me),
            Err(LabError::NoFreePort { .. })
        ));
        // Persisting keeps the file; transferring rewrites the owner.
        let mut r = r;
        let mut one = r.remove(0);
        one.transfer(dead).expect("transfer");
        assert_eq!(one.token(), dead.to_string());
        one.persist();
        assert_eq!(
            fs::read_to_string(dir.join("24500")).expect("kept"),
            dead.to_string()
        );
        // A dead owner's persisted reservation is stale again.
        let again = reg.reserve_many(1, me).expect("take over again");
        assert_eq!(again[0].port(), 24500);
        drop(again);
        assert!(!dir.join("24500").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bound_ports_are_skipped() {
        let dir = scratch("bound");
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let reg = PortRegistry::new(dir.clone(), port, port);
        assert!(matches!(
            reg.reserve_many(1, ProcessToken::current()),
            Err(LabError::NoFreePort { .. })
        ));
        drop(listener);
        let _ = fs::remove_dir_all(&dir);
    }
}
