//! Adapter swaps while the service runs.
//!
//! ```text
//! control thread --Job--> swap thread (nice +10): load from store, merge into the pristine base,
//!                         prepare, health check -> Mailbox::publish
//! inference thread: between two frames, Mailbox::swap_in replaces its engine; the old one is
//!                   dropped after that frame (about 2 ms), and the swap thread trims the heap
//! swap thread: probation (N frames without error) -> commit, or automatic rollback
//! ```
//! The inference thread owns its engine (a tract run state needs `&mut`), so the atomic
//! publication is a one-slot mailbox checked once per frame rather than a shared pointer: a frame
//! runs entirely on the engine it started with, and no frame waits for a build.
//!
//! Memory stays bounded: the pristine base, the serving engine, and at most one engine being
//! built, staged, or published and not yet taken.
//!
//! What runs is a [`TaskSet`]: the base alone, one adapter, or several task adapters on a
//! shared trunk. An activation ([`Change`]) sets the whole set or adds, replaces or removes one
//! task; the new set is built, checked, published and put on probation as a whole, so a task
//! that fails rolls the set back to the last good one and the other tasks keep their adapters.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::Engine;
use super::metrics::Metrics;
use super::status::{AdapterStatus, SwapTimes};
use crate::adapter::store::{AdapterStore, Selection, StoreState, TaskSet};
use crate::adapter::{self, Adapter};
use crate::config::AdapterSettings;
use crate::engine::EngineBuilder;
use crate::frame::RgbFrame;
use crate::report::ms;

/// Poll period of the swap thread (probation checks, freeing retired engines).
const POLL: Duration = Duration::from_millis(20);
/// How long an `activate` reply waits for the first frame on the new engine.
const FIRST_FRAME_WAIT: Duration = Duration::from_secs(10);
/// Health-check images read from a directory, at most.
const MAX_HEALTH_IMAGES: usize = 8;

/// The one-slot mailbox between the swap thread and the inference thread, plus the progress
/// of the serving engine (for probation and swap timing).
#[derive(Default)]
pub struct Mailbox {
    next: Mutex<Option<Engine>>,
    pending: AtomicBool,
    retired: Mutex<Vec<Engine>>,
    trim: AtomicBool,
    serving: AtomicU64,
    frames: AtomicU64,
    errors: AtomicU64,
    first_frame: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
}

impl Mailbox {
    /// Offers `engine` to the inference thread; an engine published earlier and not taken yet
    /// is retired.
    pub fn publish(&self, engine: Engine) {
        let old = self.next.lock().expect("mailbox lock").replace(engine);
        self.pending.store(true, Ordering::Release);
        if let Some(old) = old {
            self.retired.lock().expect("mailbox lock").push(old);
        }
    }

    /// Called by the inference thread between frames: takes a published engine, if any, in
    /// place of `engine` and returns the old one. The caller hands it to [`Mailbox::release`]
    /// after its frame: memory freed on the thread that used it goes
    /// back to the allocator cleanly (freeing it on another thread made glibc's RSS creep up
    /// over thousands of swaps).
    pub fn swap_in(&self, engine: &mut Engine) -> Option<Engine> {
        if !self.pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        let new = self.next.lock().expect("mailbox lock").take()?;
        let old = std::mem::replace(engine, new);
        self.frames.store(0, Ordering::Relaxed);
        self.errors.store(0, Ordering::Relaxed);
        *self.first_frame.lock().expect("mailbox lock") = None;
        self.serving.store(engine.generation, Ordering::Release);
        Some(old)
    }

    /// Called by the inference thread after the frame that followed a swap: drops the engine
    /// [`Mailbox::swap_in`] returned (if any) on this thread and asks the swap thread to trim
    /// the heap.
    pub fn release(&self, old: Option<Engine>) {
        if let Some(old) = old {
            drop(old);
            self.trim.store(true, Ordering::Release);
        }
    }

    /// Called by the inference thread after each frame on engine `generation`.
    pub fn frame_done(&self, generation: u64, error: Option<&str>) {
        if self.serving.load(Ordering::Acquire) != generation {
            // The first engine of a pipeline is never swapped in; adopt it.
            self.serving.store(generation, Ordering::Release);
            self.frames.store(0, Ordering::Relaxed);
            self.errors.store(0, Ordering::Relaxed);
        }
        if self.frames.fetch_add(1, Ordering::AcqRel) == 0 {
            *self.first_frame.lock().expect("mailbox lock") = Some(Instant::now());
        }
        if let Some(e) = error {
            self.errors.fetch_add(1, Ordering::AcqRel);
            *self.last_error.lock().expect("mailbox lock") = Some(e.to_string());
        }
    }

    /// (frames, errors) of `generation` if it is the serving engine.
    fn progress(&self, generation: u64) -> Option<(u64, u64)> {
        (self.serving.load(Ordering::Acquire) == generation).then(|| {
            (
                self.frames.load(Ordering::Acquire),
                self.errors.load(Ordering::Acquire),
            )
        })
    }

    /// Frees engines superseded before the inference thread took them, and returns freed
    /// memory to the system after any engine was freed. Returns how many were superseded.
    fn free_retired(&self) -> usize {
        let old: Vec<Engine> = std::mem::take(&mut *self.retired.lock().expect("mailbox lock"));
        let n = old.len();
        drop(old);
        if self.trim.swap(false, Ordering::AcqRel) || n > 0 {
            release_free_memory();
        }
        n
    }
}

type Reply = Sender<Result<Map<String, Value>, String>>;

/// Most task adapters one set may run.
pub const MAX_TASKS: usize = 8;

/// How an activation changes the set of adapters that runs: store names with their scales.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Run exactly these, in this order (none: the base model alone; one: that adapter).
    Set(Vec<(String, f32)>),
    /// Add a task after the running ones.
    Add(String, f32),
    /// Put `new` in the place of the running task `old`.
    Replace { old: String, new: (String, f32) },
    /// Stop one task; the others keep running.
    Remove(String),
}

/// A request to the swap thread.
pub enum Job {
    /// Build, check, publish and put on probation the set `change` makes.
    Activate {
        change: Change,
        at: Instant,
        reply: Option<Reply>,
    },
    /// Build and check the set `change` makes now; a later `Activate` of the same set only
    /// publishes.
    Stage {
        change: Change,
        reply: Reply,
    },
    Rollback {
        reply: Reply,
    },
    Install {
        name: String,
        bytes: Vec<u8>,
        reply: Reply,
    },
    Remove {
        name: String,
        reply: Reply,
    },
    List {
        reply: Reply,
    },
}

/// Where the control socket sends adapter jobs; re-pointed when the swap thread is replaced by a
/// reload.
pub type SwapLink = Arc<Mutex<Option<Sender<Job>>>>;

/// Sends `job` built around a reply channel and waits for the answer.
pub fn ask(
    link: &SwapLink,
    make: impl FnOnce(Reply) -> Job,
    timeout: Duration,
) -> Result<Map<String, Value>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let sent = link
        .lock()
        .expect("swap link lock")
        .as_ref()
        .map(|s| s.send(make(tx)).is_ok());
    match sent {
        None => Err("no adapter store is configured ([adapters] in the configuration)".into()),
        Some(false) => Err("the adapter manager is restarting; try again".into()),
        Some(true) => rx
            .recv_timeout(timeout)
            .map_err(|_| "no reply from the adapter manager in time".to_string())?,
    }
}

/// Frames every new engine must run on without error before it is published.
pub fn health_frames(dir: Option<&Path>) -> Result<Vec<RgbFrame>, String> {
    let Some(dir) = dir else {
        return Ok(vec![
            crate::camera::synthetic::render(7, 640, 480),
            RgbFrame::filled(640, 480, [114, 114, 114]),
        ]);
    };
    let files = crate::image_io::list_images(dir)
        .map_err(|e| format!("adapters.health_images: {}: {e}", dir.display()))?;
    let frames: Vec<RgbFrame> = files
        .iter()
        .take(MAX_HEALTH_IMAGES)
        .map(|f| {
            crate::image_io::load_rgb(f)
                .map_err(|e| format!("adapters.health_images: {}: {e}", f.display()))
        })
        .collect::<Result<_, _>>()?;
    if frames.is_empty() {
        return Err(format!(
            "adapters.health_images: {}: no .jpg/.jpeg/.png images",
            dir.display()
        ));
    }
    Ok(frames)
}

/// Runs `engine` on every health frame; the first failure is the reason.
fn health_check(engine: &mut Engine, frames: &[RgbFrame]) -> Result<(), String> {
    for (i, f) in frames.iter().enumerate() {
        let (found, _) = engine
            .detector
            .detect_tasks(f)
            .map_err(|e| format!("health check failed on frame {i}: {e}"))?;
        for (k, r) in found.iter().enumerate() {
            if let Err(e) = r {
                let task = engine
                    .tasks
                    .get(k)
                    .map_or(String::new(), |a| format!(" (task '{}')", a.name));
                return Err(format!("health check failed on frame {i}{task}: {e}"));
            }
        }
    }
    Ok(())
}

/// Hands memory freed by a retired model back to the system, so RSS reflects the live models
/// rather than the allocator's high-water mark.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap structures.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Lowers the calling thread's scheduling priority so builds yield to the frame pipeline.
fn lower_priority() {
    // SAFETY: gettid and setpriority only read their arguments; on Linux a thread id names
    // one thread for PRIO_PROCESS.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10)
    };
    if r != 0 {
        log::debug!(
            "cannot lower the swap thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// An engine built and checked ahead of its activation.
struct Staged {
    target: Vec<(String, f32)>,
    shas: Vec<String>,
    engine: Engine,
    times: SwapTimes,
}

/// The set `target` names, with the files' hashes.
fn task_set(target: &[(String, f32)], shas: &[String]) -> TaskSet {
    TaskSet(
        target
            .iter()
            .zip(shas)
            .map(|((name, scale), sha)| Selection {
                name: name.clone(),
                scale: *scale,
                sha256: sha.clone(),
            })
            .collect(),
    )
}

/// The store names and scales of a set.
fn names_of(set: &TaskSet) -> Vec<(String, f32)> {
    set.0.iter().map(|s| (s.name.clone(), s.scale)).collect()
}

/// Everything the swap thread owns.
pub struct SwapCtx {
    staged: Option<Staged>,
    first_frame_wait: Duration,
    pub factory: Arc<EngineBuilder>,
    pub store: AdapterStore,
    pub settings: AdapterSettings,
    pub health: Vec<RgbFrame>,
    pub mailbox: Arc<Mailbox>,
    pub metrics: Arc<Metrics>,
    pub state: StoreState,
    /// The last generation built.
    pub generation: u64,
    /// The generation of the active selection (serving, or published and about to serve).
    pub active_generation: u64,
    pub status: AdapterStatus,
}

impl SwapCtx {
    /// Opens the store and builds the engine to start with: the persisted selection (an
    /// uncommitted one is rolled back first), else `settings.active`, else the base. A selection
    /// that no longer builds or passes the health check falls back to the last known good one,
    /// then to the base model.
    pub fn start(
        factory: Arc<EngineBuilder>,
        settings: &AdapterSettings,
        mailbox: Arc<Mailbox>,
        metrics: Arc<Metrics>,
    ) -> Result<(SwapCtx, Engine), String> {
        let store = AdapterStore::open(&settings.store, settings.max_bytes)
            .map_err(|e| format!("adapters.store: {e}"))?;
        let health = health_frames(settings.health_images.as_deref())?;
        let saved = store.load_state().map_err(|e| e.to_string())?;
        let fresh = saved == StoreState::default();
        let (mut state, rolled) = saved.recovered();
        if rolled {
            log::warn!(
                "the activation of {} was not committed before the service stopped; rolled back to {}",
                saved.active.describe(),
                saved.last_good.describe()
            );
        }
        if fresh && !settings.active.is_empty() {
            let sel = TaskSet(
                settings
                    .active
                    .iter()
                    .map(|name| Selection {
                        name: name.clone(),
                        scale: settings.scale,
                        sha256: String::new(),
                    })
                    .collect(),
            );
            state.active = sel.clone();
            state.last_good = sel;
        }
        let mut ctx = SwapCtx {
            staged: None,
            first_frame_wait: FIRST_FRAME_WAIT,
            status: AdapterStatus {
                store: store.dir().display().to_string(),
                ..Default::default()
            },
            factory,
            store,
            settings: settings.clone(),
            health,
            mailbox,
            metrics,
            state: state.clone(),
            generation: 0,
            active_generation: 0,
        };
        let mut candidates = vec![state.active.clone()];
        if state.last_good != state.active {
            candidates.push(state.last_good.clone());
        }
        if !candidates.iter().any(TaskSet::is_base) {
            candidates.push(TaskSet::default());
        }
        let mut engine = None;
        let mut base_error = None;
        for c in candidates {
            let target = names_of(&c);
            match ctx.build_checked(&target) {
                Ok((e, shas, _)) => {
                    let sel = task_set(&target, &shas);
                    ctx.state = StoreState {
                        version: 0,
                        active: sel.clone(),
                        probation: false,
                        last_good: sel,
                        previous: ctx.state.previous.clone(),
                    };
                    engine = Some(e);
                    break;
                }
                Err(e) => {
                    log::error!("cannot start on {}: {e}", c.describe());
                    ctx.metrics
                        .update(|s| s.last_error = Some(format!("adapter store: {e}")));
                    if c.is_base() {
                        base_error = Some(e.to_string());
                    }
                }
            }
        }
        let engine = engine.ok_or_else(|| {
            format!(
                "the base model does not build or pass the health check: {}",
                base_error.unwrap_or_default()
            )
        })?;
        ctx.active_generation = engine.generation;
        if ctx.state != saved {
            ctx.store
                .save_state(&ctx.state)
                .map_err(|e| e.to_string())?;
        }
        ctx.refresh_status();
        Ok((ctx, engine))
    }

    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// The set `change` makes of the running one, or why it is not a valid set.
    fn resolve(&self, change: Change) -> Result<Vec<(String, f32)>, String> {
        let mut set = names_of(&self.state.active);
        let running = || self.state.active.describe();
        let position = |set: &[(String, f32)], name: &str| set.iter().position(|(n, _)| n == name);
        match change {
            Change::Set(v) => set = v,
            Change::Add(name, scale) => {
                if position(&set, &name).is_some() {
                    return Err(format!("'{name}' is already a running task"));
                }
                set.push((name, scale));
            }
            Change::Replace { old, new } => {
                let i = position(&set, &old).ok_or_else(|| {
                    format!("'{old}' is not a running task (running: {})", running())
                })?;
                if new.0 != old && position(&set, &new.0).is_some() {
                    return Err(format!("'{}' is already a running task", new.0));
                }
                set[i] = new;
            }
            Change::Remove(name) => {
                let i = position(&set, &name).ok_or_else(|| {
                    format!("'{name}' is not a running task (running: {})", running())
                })?;
                set.remove(i);
            }
        }
        if let Some((dup, _)) = set
            .iter()
            .enumerate()
            .find(|(i, (n, _))| position(&set[..*i], n).is_some())
            .map(|(_, x)| x)
        {
            return Err(format!("'{dup}' is named twice; each task runs once"));
        }
        if set.len() > MAX_TASKS {
            return Err(format!(
                "{} tasks asked for; at most {MAX_TASKS} run together",
                set.len()
            ));
        }
        Ok(set)
    }

    /// Loads every adapter of `target` from the store, builds and health-checks the set.
    fn build_checked(
        &mut self,
        target: &[(String, f32)],
    ) -> Result<(Engine, Vec<String>, SwapTimes), String> {
        let t = Instant::now();
        let adapters = target
            .iter()
            .map(|(name, _)| self.store.load(name).map_err(|e| e.to_string()))
            .collect::<Result<Vec<Adapter>, String>>()?;
        // Records name each task by its adapter's name: two entries holding the same adapter
        // could not be told apart.
        for (i, a) in adapters.iter().enumerate() {
            if let Some(j) = adapters[..i]
                .iter()
                .position(|b| b.header.name == a.header.name)
            {
                return Err(format!(
                    "'{}' and '{}' are both adapter '{}'; each task needs its own adapter",
                    target[j].0, target[i].0, a.header.name
                ));
            }
        }
        let generation = self.next_generation();
        let pairs: Vec<(&Adapter, f32)> = adapters
            .iter()
            .zip(target)
            .map(|(a, (_, s))| (a, *s))
            .collect();
        let mut engine = Engine::build(&self.factory, &pairs, generation)
            .map_err(|e| crate::exit::one_line(&e))?;
        let build_ms = ms(t.elapsed());
        let graph_reused = engine.detector.prepared().graph_reused();
        let t = Instant::now();
        health_check(&mut engine, &self.health)?;
        engine
            .detector
            .reset_session()
            .map_err(|e| format!("cannot start an inference state: {e}"))?;
        Ok((
            engine,
            adapters.iter().map(|a| a.sha256().to_string()).collect(),
            SwapTimes {
                build_ms,
                graph_reused,
                health_ms: ms(t.elapsed()),
                command_to_first_frame_ms: None,
            },
        ))
    }

    fn refresh_status(&mut self) {
        self.status.active = self.state.active.clone();
        self.status.last_good = self.state.last_good.clone();
        self.status.generation = self.active_generation;
        self.status.staged = self.staged.as_ref().map(|s| task_set(&s.target, &s.shas));
        self.status.probation = self.state.probation;
        self.status.probation_frames = self.state.probation.then(|| {
            let done = self
                .mailbox
                .progress(self.active_generation)
                .map_or(0, |(f, _)| f);
            [
                done.min(self.settings.probation_frames),
                self.settings.probation_frames,
            ]
        });
        let st = self.status.clone();
        self.metrics.update(|s| s.adapters = Some(st));
    }

    /// Builds, checks, persists and publishes `target`. `committed` skips probation (rollbacks
    /// and the base model are known good).
    fn activate(
        &mut self,
        target: Vec<(String, f32)>,
        at: Instant,
        committed: bool,
    ) -> Result<Map<String, Value>, String> {
        self.status.building = Some(describe_target(&target));
        self.refresh_status();
        let staged = self.staged.take();
        let mut was_staged = false;
        let built = match staged {
            Some(st) if !target.is_empty() && st.target == target => {
                was_staged = true;
                Ok((st.engine, st.shas, st.times))
            }
            other => {
                // At most one model besides the serving one: a different staged one goes.
                drop(other);
                self.build_checked(&target)
            }
        };
        self.status.building = None;
        let (engine, shas, mut times) = match built {
            Ok(b) => b,
            Err(e) => {
                self.status.rejected += 1;
                self.refresh_status();
                log::error!("activation refused, the running model keeps serving: {e}");
                self.metrics
                    .update(|s| s.last_error = Some(format!("activation refused: {e}")));
                self.metrics.event(
                    "refused",
                    Map::from_iter([
                        ("target".into(), json!(describe_target(&target))),
                        ("error".into(), json!(e)),
                    ]),
                );
                return Err(e);
            }
        };
        let sel = task_set(&target, &shas);
        let probation = !committed && self.settings.probation_frames > 0 && !sel.is_base();
        let mut next = self.state.clone();
        if !self.state.probation && self.state.active != sel {
            next.previous = self.state.active.clone();
        }
        next.active = sel.clone();
        next.probation = probation;
        if !probation {
            next.last_good = sel.clone();
        }
        // Persist before publishing: a crash in between restarts on the last good selection.
        self.store
            .save_state(&next)
            .map_err(|e| format!("cannot save the adapter state: {e}"))?;
        self.state = next;
        let generation = engine.generation;
        self.active_generation = generation;
        self.mailbox.publish(engine);
        self.status.swaps += 1;
        self.refresh_status();
        log::info!(
            "activated {} as generation {generation}{}",
            sel.describe(),
            if probation { " (on probation)" } else { "" }
        );
        // Report the first frame on the new engine (frames may not flow: bounded wait).
        let deadline = Instant::now() + self.first_frame_wait;
        while Instant::now() < deadline {
            if self
                .mailbox
                .progress(generation)
                .is_some_and(|(f, _)| f > 0)
            {
                let first = *self.mailbox.first_frame.lock().expect("mailbox lock");
                times.command_to_first_frame_ms =
                    first.map(|t| ms(t.saturating_duration_since(at)));
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.status.last_swap = Some(times);
        self.refresh_status();
        let mut m = Map::new();
        m.insert("active".into(), json!(sel));
        m.insert("generation".into(), json!(generation));
        m.insert("probation".into(), json!(probation));
        m.insert("staged".into(), json!(was_staged));
        m.insert("times".into(), json!(times));
        self.metrics.event("activated", m.clone());
        Ok(m)
    }

    /// Commits or rolls back the selection on probation.
    fn check_probation(&mut self) {
        if !self.state.probation {
            return;
        }
        let Some((frames, errors)) = self.mailbox.progress(self.active_generation) else {
            return;
        };
        if errors > 0 {
            let why = self
                .mailbox
                .last_error
                .lock()
                .expect("mailbox lock")
                .clone()
                .unwrap_or_default();
            log::error!(
                "{} failed its probation ({errors} errors in {frames} frames: {why}); rolling back to {}",
                self.state.active.describe(),
                self.state.last_good.describe()
            );
            let to = self.state.last_good.clone();
            self.count_rollback(
                &to,
                &format!("{errors} errors in {frames} frames on probation: {why}"),
            );
            let target = names_of(&to);
            if let Err(e) = self.activate(target, Instant::now(), true) {
                log::error!("rollback failed, falling back to the base model: {e}");
                let _ = self.activate(Vec::new(), Instant::now(), true);
            }
            self.metrics.update(|s| {
                s.last_error = Some(format!("adapter rolled back after probation: {why}"))
            });
        } else if frames >= self.settings.probation_frames {
            let mut next = self.state.clone();
            next.probation = false;
            next.last_good = next.active.clone();
            match self.store.save_state(&next) {
                Ok(()) => {
                    log::info!(
                        "{} committed after {frames} clean frames",
                        next.active.describe()
                    );
                    self.metrics.event(
                        "committed",
                        Map::from_iter([
                            ("active".into(), json!(next.active)),
                            ("frames".into(), json!(frames)),
                        ]),
                    );
                    self.state = next;
                }
                Err(e) => log::error!("cannot commit the adapter state: {e}"),
            }
        }
        self.refresh_status();
    }

    /// Builds and health-checks the set `change` makes ahead of time, so that activating the
    /// same set later only waits for the next frame. Replaces an earlier staged engine.
    fn stage(&mut self, change: Change) -> Result<Map<String, Value>, String> {
        self.staged = None;
        let target = self.resolve(change)?;
        if target.is_empty() {
            return Err("the base model is always ready; nothing to stage".into());
        }
        self.status.building = Some(format!("{} (staging)", describe_target(&target)));
        self.refresh_status();
        let built = self.build_checked(&target);
        self.status.building = None;
        self.refresh_status();
        let (engine, shas, times) = built.inspect_err(|_| self.status.rejected += 1)?;
        let mut m = Map::new();
        m.insert("staged".into(), json!(task_set(&target, &shas)));
        m.insert("times".into(), json!(times));
        self.staged = Some(Staged {
            target,
            shas,
            engine,
            times,
        });
        self.refresh_status();
        Ok(m)
    }

    fn rollback(&mut self) -> Result<Map<String, Value>, String> {
        let (active, previous) = (&self.state.active, &self.state.previous);
        let target = if self.state.probation {
            self.state.last_good.clone()
        } else if !previous.is_base() && previous != active {
            previous.clone()
        } else if !active.is_base() {
            TaskSet::default()
        } else {
            return Err("nothing to roll back to: the base model is active".into());
        };
        self.count_rollback(&target, "rollback requested");
        self.activate(names_of(&target), Instant::now(), true)
    }

    /// Counts a rollback from the active set to `to` and reports it as a `rolled_back` event.
    fn count_rollback(&mut self, to: &TaskSet, reason: &str) {
        self.status.rollbacks += 1;
        self.metrics.event(
            "rolled_back",
            Map::from_iter([
                ("from".into(), json!(self.state.active)),
                ("to".into(), json!(to)),
                ("reason".into(), json!(reason)),
            ]),
        );
    }

    fn install(&mut self, name: &str, bytes: &[u8]) -> Result<Map<String, Value>, String> {
        let base = self.factory.base();
        let a = self
            .store
            .install(name, bytes, &self.state, |_| {
                let a = Adapter::from_bytes(bytes, name).map_err(|e| e.to_string())?;
                // Checks every target against the base (names, shapes, fingerprint, values)
                // without building a merged model.
                adapter::merge::merged_weights(base, &a, 1.0).map_err(|e| e.to_string())?;
                Ok(a)
            })
            .map_err(|e| e.to_string())?;
        log::info!("installed adapter '{name}' ({})", a.id());
        let mut m = Map::new();
        m.insert(
            "installed".into(),
            json!({"name": name, "adapter": a.header.name, "sha256": a.sha256(),
                   "bytes": bytes.len(), "kind": a.header.kind}),
        );
        self.metrics.event("installed", m.clone());
        Ok(m)
    }

    fn list(&self) -> Result<Map<String, Value>, String> {
        let list = self.store.list().map_err(|e| e.to_string())?;
        let mut m = Map::new();
        m.insert("adapters".into(), json!(list));
        m.insert("active".into(), json!(self.state.active));
        m.insert("last_good".into(), json!(self.state.last_good));
        m.insert("probation".into(), json!(self.state.probation));
        Ok(m)
    }

    /// Whether the staged engine runs store entry `name`.
    fn staged_uses(&self, name: &str) -> bool {
        self.staged
            .as_ref()
            .is_some_and(|s| s.target.iter().any(|(n, _)| n == name))
    }

    fn handle(&mut self, job: Job) {
        let answer = |r: &Reply, v| {
            let _ = r.send(v);
        };
        match job {
            Job::Activate { change, at, reply } => {
                let r = self
                    .resolve(change)
                    .inspect_err(|_| self.status.rejected += 1)
                    .and_then(|target| self.activate(target, at, false));
                if let Some(reply) = reply {
                    answer(&reply, r);
                }
            }
            Job::Stage { change, reply } => answer(&reply, self.stage(change)),
            Job::Rollback { reply } => answer(&reply, self.rollback()),
            Job::Install { name, bytes, reply } => {
                if self.staged_uses(&name) {
                    self.staged = None;
                }
                answer(&reply, self.install(&name, &bytes))
            }
            Job::Remove { name, reply } => {
                if self.staged_uses(&name) {
                    self.staged = None;
                }
                let r = self
                    .store
                    .remove(&name, &self.state)
                    .map(|()| Map::from_iter([("removed".into(), Value::from(name))]))
                    .map_err(|e| e.to_string());
                if let Ok(m) = &r {
                    self.metrics.event("removed", m.clone());
                }
                answer(&reply, r)
            }
            Job::List { reply } => answer(&reply, self.list()),
        }
        self.refresh_status();
    }
}

/// The running swap thread; stops when dropped, even while other [`Swapper::sender`]s are
/// alive (jobs still queued then are dropped, and their requesters see the reply channel
/// close).
pub struct Swapper {
    tx: Option<Sender<Job>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Swapper {
    /// Starts the swap thread over `ctx`.
    pub fn start(mut ctx: SwapCtx) -> std::io::Result<Self> {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("perch-swap".into())
            .spawn(move || {
                lower_priority();
                while !stopping.load(Ordering::SeqCst) {
                    match rx.recv_timeout(POLL) {
                        Ok(job) => ctx.handle(job),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    ctx.mailbox.free_retired();
                    ctx.check_probation();
                }
                ctx.mailbox.free_retired();
            })?;
        Ok(Swapper {
            tx: Some(tx),
            stop,
            thread: Some(thread),
        })
    }

    /// A sender for jobs.
    pub fn sender(&self) -> Sender<Job> {
        self.tx.clone().expect("swapper running")
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.tx.take();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `base`, `a (scale 1)` or `a (scale 1) + b (scale 0.5)`, for status and logs.
fn describe_target(target: &[(String, f32)]) -> String {
    if target.is_empty() {
        return "base".into();
    }
    target
        .iter()
        .map(|(n, s)| format!("{n} (scale {s})"))
        .collect::<Vec<_>>()
        .join(" + ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelSettings;

    fn settings() -> ModelSettings {
        ModelSettings::new("models/tree-yolo11n-320.onnx")
    }

    /// A swap context without its thread on a fresh store in a temporary `perch-<tag>-<pid>`
    /// directory (returned, to remove), activations reporting at once, with each committed
    /// adapter `(store name, file stem)` installed; and the serving engine and mailbox.
    fn swap_ctx(
        tag: &str,
        install: &[(&str, &str)],
    ) -> (std::path::PathBuf, SwapCtx, Engine, Arc<Mailbox>) {
        let dir = std::env::temp_dir().join(format!("perch-{tag}-{}", std::process::id()));
        let adapters = store_settings(&dir);
        let factory = Arc::new(EngineBuilder::load(&settings()).unwrap());
        let mb = Arc::new(Mailbox::default());
        let (mut ctx, serving) =
            SwapCtx::start(factory, &adapters, mb.clone(), Arc::new(Metrics::default())).unwrap();
        ctx.first_frame_wait = Duration::ZERO;
        for (name, file) in install {
            let bytes = std::fs::read(format!("models/adapters/{file}.safetensors")).unwrap();
            ctx.install(name, &bytes).unwrap();
        }
        (dir, ctx, serving, mb)
    }

    /// One frame on whatever engine the mailbox holds, reported done (with `err`, if any).
    fn frame(mb: &Mailbox, e: &mut Engine, err: Option<&str>) {
        let old = mb.swap_in(e);
        mb.frame_done(e.generation, err);
        mb.release(old);
    }

    /// Settings for a fresh, empty store at `dir` (removed first), probation of 3 frames.
    fn store_settings(dir: &std::path::Path) -> AdapterSettings {
        let _ = std::fs::remove_dir_all(dir);
        AdapterSettings {
            store: dir.to_path_buf(),
            max_bytes: 1 << 20,
            active: Vec::new(),
            scale: 1.0,
            probation_frames: 3,
            health_images: None,
        }
    }

    #[test]
    fn mailbox_swaps_between_frames_and_tracks_progress() {
        let f = EngineBuilder::load(&settings()).unwrap();
        let mb = Mailbox::default();
        let mut serving = Engine::build(&f, &[], 1).unwrap();
        mb.frame_done(1, None);
        assert_eq!(mb.progress(1), Some((1, 0)));
        assert!(mb.swap_in(&mut serving).is_none(), "nothing published");
        mb.publish(Engine::build(&f, &[], 2).unwrap());
        mb.publish(Engine::build(&f, &[], 3).unwrap());
        let old = mb.swap_in(&mut serving).unwrap();
        assert_eq!(old.generation, 1);
        assert_eq!(serving.generation, 3, "the newest publication wins");
        assert_eq!(mb.progress(1), None);
        assert_eq!(mb.progress(3), Some((0, 0)));
        mb.frame_done(3, Some("boom"));
        assert_eq!(mb.progress(3), Some((1, 1)));
        assert_eq!(mb.free_retired(), 1, "the superseded generation 2");
        assert!(mb.swap_in(&mut serving).is_none());
    }

    /// The swap thread's logic without its thread: activation publishes, a clean probation
    /// commits, a failing one rolls back to the last good adapter, and the state file follows.
    #[test]
    fn probation_commits_or_rolls_back() {
        let (dir, mut ctx, mut serving, mb) =
            swap_ctx("probation", &[("osbs", "osbs-lora"), ("soap", "soap-lora")]);
        ctx.activate(vec![("osbs".into(), 1.0)], Instant::now(), false)
            .unwrap();
        assert!(ctx.state.probation);
        // Staging the next adapter meanwhile does not disturb the probation of this one.
        ctx.stage(Change::Set(vec![("soap".into(), 0.5)])).unwrap();
        assert_eq!(ctx.status.staged.as_ref().unwrap().0[0].name, "soap");
        for _ in 0..3 {
            frame(&mb, &mut serving, None);
            ctx.check_probation();
        }
        assert_eq!(serving.adapter.as_ref().unwrap().name, "osbs-lora");
        let saved = ctx.store.load_state().unwrap();
        assert!(!saved.probation);
        assert_eq!(saved.last_good.0[0].name, "osbs");

        let r = ctx
            .activate(vec![("soap".into(), 0.5)], Instant::now(), false)
            .unwrap();
        assert_eq!(r["staged"], true);
        frame(&mb, &mut serving, None);
        assert_eq!(serving.adapter.as_ref().unwrap().name, "soap-lora");
        assert!(ctx.store.load_state().unwrap().probation);
        frame(
            &mb,
            &mut serving,
            Some("frame 9: output has a non-finite value"),
        );
        ctx.check_probation();
        frame(&mb, &mut serving, None);
        assert_eq!(serving.adapter.as_ref().unwrap().name, "osbs-lora");
        let saved = ctx.store.load_state().unwrap();
        assert_eq!(saved.active.0[0].name, "osbs");
        assert!(!saved.probation);
        assert_eq!(ctx.status.rollbacks, 1);
        // Neither the active nor the rollback target can be removed; the failed one can.
        assert!(ctx.store.remove("osbs", &ctx.state).is_err());
        ctx.store.remove("soap", &ctx.state).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Task sets: adding, replacing and removing one task; a replaced task that fails its
    /// probation rolls the set back with the other task untouched; invalid changes are refused
    /// with a reason and change nothing.
    #[test]
    fn task_changes_and_their_rollback() {
        let (dir, mut ctx, mut serving, mb) = swap_ctx(
            "tasks",
            &[
                ("osbs", "osbs-head"),
                ("soap", "soap-head"),
                ("lora", "osbs-lora"),
            ],
        );
        let names = |e: &Engine| e.tasks.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        let run = |ctx: &mut SwapCtx, c: Change| {
            ctx.resolve(c)
                .and_then(|t| ctx.activate(t, Instant::now(), false))
        };
        run(&mut ctx, Change::Set(vec![("osbs".into(), 1.0)])).unwrap();
        run(&mut ctx, Change::Add("soap".into(), 1.0)).unwrap();
        for _ in 0..3 {
            frame(&mb, &mut serving, None);
            ctx.check_probation();
        }
        assert_eq!(names(&serving), ["osbs-head", "soap-head"]);
        assert!(serving.adapter.is_none());
        assert_eq!(ctx.store.load_state().unwrap().last_good.0.len(), 2);

        for (bad, why) in [
            (Change::Add("osbs".into(), 1.0), "already a running task"),
            (Change::Remove("nope".into()), "not a running task"),
            (
                Change::Replace {
                    old: "osbs".into(),
                    new: ("soap".into(), 1.0),
                },
                "already a running task",
            ),
            (
                Change::Set(vec![("osbs".into(), 1.0), ("osbs".into(), 0.5)]),
                "named twice",
            ),
        ] {
            let e = ctx.resolve(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        assert!(run(&mut ctx, Change::Add("missing".into(), 1.0)).is_err());
        assert_eq!(ctx.state.active.0.len(), 2);

        // Replace one task; its probation fails: back to the last good set.
        run(
            &mut ctx,
            Change::Replace {
                old: "soap".into(),
                new: ("lora".into(), 1.0),
            },
        )
        .unwrap();
        frame(&mb, &mut serving, None);
        assert_eq!(names(&serving), ["osbs-head", "osbs-lora"]);
        frame(
            &mb,
            &mut serving,
            Some("frame 3: output has a non-finite value"),
        );
        ctx.check_probation();
        frame(&mb, &mut serving, None);
        assert_eq!(names(&serving), ["osbs-head", "soap-head"]);

        // Removing one task leaves a single adapter: today's single-task engine.
        run(&mut ctx, Change::Remove("osbs".into())).unwrap();
        frame(&mb, &mut serving, None);
        assert!(serving.tasks.is_empty());
        assert_eq!(serving.adapter.as_ref().unwrap().name, "soap-head");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A reload drops the old core's swapper while the control link still holds one of its
    /// senders: the drop must not wait for that sender to go away.
    #[test]
    fn swapper_stops_while_a_sender_is_alive() {
        let dir = std::env::temp_dir().join(format!("perch-swapdrop-{}", std::process::id()));
        let adapters = store_settings(&dir);
        let factory = Arc::new(EngineBuilder::load(&settings()).unwrap());
        let (ctx, _serving) = SwapCtx::start(
            factory,
            &adapters,
            Arc::new(Mailbox::default()),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let swapper = Swapper::start(ctx).unwrap();
        let held = swapper.sender();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(swapper);
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("Swapper::drop returned while a sender was alive");
        // A job sent after the stop is not answered: its reply channel closes.
        let (reply, answer) = std::sync::mpsc::channel();
        let _ = held.send(Job::List { reply });
        assert!(answer.recv_timeout(Duration::from_secs(1)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn health_check_rejects_non_finite_output() {
        let f = EngineBuilder::load(&settings()).unwrap();
        let frames = health_frames(None).unwrap();
        let mut ok = Engine::build(&f, &[], 1).unwrap();
        health_check(&mut ok, &frames).unwrap();
        // A replace adapter that puts NaN into the first conv passes no file check (loading
        // refuses non-finite values), so build the broken model through a huge finite scale.
        let a = Adapter::load("models/adapters/osbs-lora-all.safetensors").unwrap();
        let mut bad = Engine::build(&f, &[(&a, 1e30)], 2).unwrap();
        let e = health_check(&mut bad, &frames).unwrap_err();
        assert!(e.contains("non-finite"), "{e}");
        // In a task set, every task is checked, not only the first.
        let good = Adapter::load("models/adapters/osbs-head.safetensors").unwrap();
        let mut set = Engine::build(&f, &[(&good, 1.0), (&a, 1e30)], 3).unwrap();
        let e = health_check(&mut set, &frames).unwrap_err();
        assert!(
            e.contains("task 'osbs-lora-all'") && e.contains("non-finite"),
            "{e}"
        );
    }
}
