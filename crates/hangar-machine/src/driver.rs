//! The seam between the control plane and the host: what `hangar-api`
//! asks of a machine driver, and a recording fake for tests of the
//! control plane's decisions that need neither root nor runc.

use std::path::PathBuf;
use std::process::Output;

use crate::runtime::{Created, MachineSpec, ProcState, VmInfo};
use crate::Result;

/// A machine driver: everything the control plane does to a machine on
/// the host goes through here. [`crate::Runtime`] is the real one (runc
/// containers and QEMU micro-VMs, each machine supervised by its shim);
/// [`fake::FakeDriver`] records calls for tests.
pub trait Driver: Send + Sync {
    /// Make the machine's root filesystem, network and bundle.
    fn create(&self, spec: &MachineSpec) -> Result<Created>;
    /// Start the machine's app; it runs on without the caller.
    fn start(&self, id: &str, slot: u32) -> Result<()>;
    /// Whether it runs, and how it ended.
    fn state(&self, id: &str) -> ProcState;
    /// Send a signal (`SIGTERM`, `SIGKILL`, ...) to the app.
    fn signal(&self, id: &str, signal: &str) -> Result<()>;
    /// Run a command in the running machine, as `user` (a user of its
    /// image) or root; output capped per stream.
    fn exec(&self, id: &str, exec: &Exec<'_>) -> Result<Output>;
    /// Remove every trace of the machine. Idempotent.
    fn destroy(&self, id: &str) -> Result<()>;
    /// The machine's log file (its app's output).
    fn log_path(&self, id: &str) -> PathBuf;
    /// Give back what a machine that does not run still holds.
    fn release(&self, id: &str);
    /// Of `ids` (machines that do not run), those still holding host
    /// resources beyond their disk.
    fn holding_host_resources(&self, ids: &[&str]) -> Vec<String>;
    /// The size of the disk that holds the machines (MB).
    fn disk_capacity_mb(&self) -> u64;
    /// Remove what no machine or stored image needs; how many items went.
    fn gc(&self) -> Result<usize>;
    /// What a micro-VM machine's VMM says (none for a container).
    fn vm_info(&self, id: &str) -> Option<VmInfo>;
    /// The ids of the machines the host has (created, not destroyed).
    fn machines(&self) -> Vec<String>;
    /// What the running machine uses (none when it does not run).
    fn usage(&self, id: &str) -> Option<crate::usage::Usage>;
    /// Run `argv` in the running machine on a new terminal of `rows` x
    /// `cols`, with `env` (`KEY=value`), as `user` (a user of its image)
    /// or root.
    fn console(
        &self,
        id: &str,
        argv: &[String],
        env: &[String],
        user: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<crate::console::Console>;
}

/// A command for [`Driver::exec`].
pub struct Exec<'a> {
    pub argv: &'a [String],
    /// `KEY=value` pairs.
    pub env: &'a [String],
    /// `name`, `uid`, `name:group` or `uid:gid`; `None`: root.
    pub user: Option<&'a str>,
    pub stdin: &'a [u8],
}

pub mod fake {
    //! A driver that runs nothing: machines are entries in a table whose
    //! process states the test sets, and every call is recorded, so the
    //! control plane's decisions can be tested in order and without root.

    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::process::Output;
    use std::sync::{Mutex, MutexGuard};

    use super::{Driver, Exec};
    use crate::runtime::{Created, Exit, MachineSpec, ProcState, VmInfo};
    use crate::{Error, Result};

    /// One call the control plane made, with the machine's id.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Call {
        Create(String),
        Start(String),
        Signal(String, String),
        Exec(String),
        Destroy(String),
        Release(String),
    }

    #[derive(Default)]
    struct Inner {
        states: HashMap<String, ProcState>,
        calls: Vec<Call>,
        /// Machines whose app ignores SIGTERM (only SIGKILL stops them).
        stubborn: Vec<String>,
        /// The next create fails with this.
        fail_create: Option<String>,
        /// Each machine's image.
        images: HashMap<String, String>,
        /// Apps of these images exit with this code as soon as they start.
        crashing: HashMap<String, i32>,
    }

    /// See the module's doc.
    pub struct FakeDriver {
        logs: PathBuf,
        inner: Mutex<Inner>,
    }

    impl FakeDriver {
        /// Logs go under `logs` (a test's temporary directory).
        pub fn new(logs: impl Into<PathBuf>) -> FakeDriver {
            FakeDriver {
                logs: logs.into(),
                inner: Mutex::default(),
            }
        }

        fn inner(&self) -> MutexGuard<'_, Inner> {
            self.inner.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Every call so far, in order.
        pub fn calls(&self) -> Vec<Call> {
            self.inner().calls.clone()
        }

        /// Forget the calls so far.
        pub fn clear_calls(&self) {
            self.inner().calls.clear();
        }

        /// The machine's app ends on its own with `code`.
        pub fn exit(&self, id: &str, code: i32, oom: bool) {
            self.inner()
                .states
                .insert(id.to_string(), ProcState::Exited(Exit { code, oom, at: 0 }));
        }

        /// What the host says of the machine's process, set by the test
        /// (`NotRunning` for a shim that vanished, as after a reboot).
        pub fn set_state(&self, id: &str, state: ProcState) {
            self.inner().states.insert(id.to_string(), state);
        }

        /// The machine's app ignores SIGTERM.
        pub fn stubborn(&self, id: &str) {
            self.inner().stubborn.push(id.to_string());
        }

        /// Machines of `image` exit with `code` as soon as they start.
        pub fn crash_on_start(&self, image: &str, code: i32) {
            self.inner().crashing.insert(image.to_string(), code);
        }

        /// The next create fails with `why`.
        pub fn fail_next_create(&self, why: &str) {
            self.inner().fail_create = Some(why.to_string());
        }
    }

    impl Driver for FakeDriver {
        fn create(&self, spec: &MachineSpec) -> Result<Created> {
            let mut inner = self.inner();
            inner.calls.push(Call::Create(spec.id.clone()));
            if let Some(why) = inner.fail_create.take() {
                return Err(Error::Host(why));
            }
            inner.states.insert(spec.id.clone(), ProcState::NotRunning);
            inner.images.insert(spec.id.clone(), spec.image.to_string());
            Ok(Created {
                addresses: crate::network::address(spec.slot),
                unpacked: false,
            })
        }

        fn start(&self, id: &str, _slot: u32) -> Result<()> {
            let mut inner = self.inner();
            inner.calls.push(Call::Start(id.to_string()));
            let crash = inner
                .images
                .get(id)
                .and_then(|image| inner.crashing.get(image))
                .copied();
            match inner.states.get_mut(id) {
                Some(state) => {
                    *state = match crash {
                        Some(code) => ProcState::Exited(Exit {
                            code,
                            oom: false,
                            at: 0,
                        }),
                        None => ProcState::Running,
                    };
                    Ok(())
                }
                None => Err(Error::NoMachine(id.to_string())),
            }
        }

        fn state(&self, id: &str) -> ProcState {
            self.inner()
                .states
                .get(id)
                .cloned()
                .unwrap_or(ProcState::NotRunning)
        }

        fn signal(&self, id: &str, signal: &str) -> Result<()> {
            let mut inner = self.inner();
            inner
                .calls
                .push(Call::Signal(id.to_string(), signal.to_string()));
            let ignored = signal != "SIGKILL" && inner.stubborn.iter().any(|s| s == id);
            let Some(state) = inner.states.get_mut(id) else {
                return Err(Error::NoMachine(id.to_string()));
            };
            if *state == ProcState::Running && !ignored {
                let code = if signal == "SIGKILL" { 137 } else { 143 };
                *state = ProcState::Exited(Exit {
                    code,
                    oom: false,
                    at: 0,
                });
            }
            Ok(())
        }

        fn exec(&self, id: &str, exec: &Exec<'_>) -> Result<Output> {
            self.inner().calls.push(Call::Exec(id.to_string()));
            use std::os::unix::process::ExitStatusExt;
            Ok(Output {
                status: std::process::ExitStatus::from_raw(0),
                stdout: exec.argv.join(" ").into_bytes(),
                stderr: Vec::new(),
            })
        }

        fn destroy(&self, id: &str) -> Result<()> {
            let mut inner = self.inner();
            inner.calls.push(Call::Destroy(id.to_string()));
            inner.states.remove(id);
            Ok(())
        }

        fn log_path(&self, id: &str) -> PathBuf {
            self.logs.join(format!("{id}.log"))
        }

        fn release(&self, id: &str) {
            self.inner().calls.push(Call::Release(id.to_string()));
        }

        fn holding_host_resources(&self, _ids: &[&str]) -> Vec<String> {
            Vec::new()
        }

        fn disk_capacity_mb(&self) -> u64 {
            1 << 20
        }

        fn gc(&self) -> Result<usize> {
            Ok(0)
        }

        fn machines(&self) -> Vec<String> {
            let mut ids: Vec<String> = self.inner().states.keys().cloned().collect();
            ids.sort();
            ids
        }

        fn vm_info(&self, _id: &str) -> Option<VmInfo> {
            None
        }

        fn usage(&self, _id: &str) -> Option<crate::usage::Usage> {
            None
        }

        fn console(
            &self,
            id: &str,
            _argv: &[String],
            _env: &[String],
            _user: Option<&str>,
            _rows: u16,
            _cols: u16,
        ) -> Result<crate::console::Console> {
            Err(crate::Error::Host(format!(
                "the fake driver runs no console for {id}"
            )))
        }
    }
}
