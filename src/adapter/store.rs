//! The on-device adapter store: a directory of installed adapter files plus a small state file
//! naming the active adapter and the last known good one.
//!
//! Layout: `<dir>/<name>.safetensors` per adapter and `<dir>/state.json`. Every change is
//! crash-safe: adapter files are written to a temporary name, fsynced, verified, renamed and the
//! directory fsynced; the state file is replaced atomically the same way. After a crash or power
//! loss at any point the store holds either the old or the new version of each file, never a
//! torn one; leftover temporary files are removed by [`AdapterStore::open`].

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Adapter;

/// File name suffix of installed adapters.
const SUFFIX: &str = ".safetensors";
/// Prefix of files being installed; removed at open.
const INCOMING: &str = ".incoming-";
const STATE: &str = "state.json";
const STATE_VERSION: u32 = 1;
/// Longest adapter name.
pub const MAX_NAME: usize = 64;

/// Why a store operation failed. Messages name the store path or the adapter.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A name that cannot be used as a store entry.
    #[error("adapter name '{name}': {reason}")]
    BadName { name: String, reason: String },
    #[error("adapter '{name}' is {bytes} bytes, over the store's {quota}-byte limit")]
    TooLarge {
        name: String,
        bytes: u64,
        quota: u64,
    },
    #[error("no adapter '{0}' in the store")]
    NotFound(String),
    /// The adapter is active or the rollback target.
    #[error("adapter '{name}' is {role}; {hint}")]
    InUse {
        name: String,
        role: &'static str,
        hint: &'static str,
    },
    /// Verification refused the file (not an adapter, does not fit the base).
    #[error("{0}")]
    Rejected(String),
}

/// An adapter and the scale it runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// Store entry name.
    pub name: String,
    /// LoRA delta scale.
    pub scale: f32,
    /// sha256 of the file when it was selected.
    pub sha256: String,
}

/// The adapters that run: none (the base model alone), one, or several, each its own task on
/// the shared trunk (in task order; names are unique).
///
/// In JSON: `null`, one selection object, or an array of them (two or more), so that a state
/// file written before task sets existed reads unchanged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskSet(pub Vec<Selection>);

impl TaskSet {
    /// True for the base model alone.
    pub fn is_base(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether store entry `name` is one of the tasks.
    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.name == name)
    }

    /// `'a'`, `'a' + 'b'`, or `the base model`, for messages.
    pub fn describe(&self) -> String {
        if self.0.is_empty() {
            return "the base model".into();
        }
        self.0
            .iter()
            .map(|s| format!("'{}'", s.name))
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

impl Serialize for TaskSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [] => s.serialize_none(),
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TaskSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(Selection),
            Many(Vec<Selection>),
        }
        Ok(match Option::<Form>::deserialize(d)? {
            None => TaskSet::default(),
            Some(Form::One(s)) => TaskSet(vec![s]),
            Some(Form::Many(v)) => TaskSet(v),
        })
    }
}

/// What should run: persisted in `state.json`.
///
/// An empty `active` means the base model alone. While `probation` is true the active
/// selection has not proven itself yet, and a restart falls back to `last_good`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreState {
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub active: TaskSet,
    #[serde(default)]
    pub probation: bool,
    #[serde(default)]
    pub last_good: TaskSet,
    /// The committed selection before the current one (target of a manual rollback).
    #[serde(default)]
    pub previous: TaskSet,
}

/// One installed adapter, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    pub name: String,
    pub bytes: u64,
    /// sha256 of the file; empty when the file no longer loads.
    pub sha256: String,
    /// The adapter's own name from its header.
    pub adapter: String,
    pub kind: String,
    /// Why the file no longer loads (disk corruption), if it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An adapter store directory with a per-file size quota.
#[derive(Debug, Clone)]
pub struct AdapterStore {
    dir: PathBuf,
    max_bytes: u64,
}

/// Checks that `name` is a safe store entry name: 1..=64 of `[A-Za-z0-9._-]`, not starting with
/// a dot.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| StoreError::BadName {
        name: name.chars().take(80).collect(),
        reason: reason.into(),
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad(&format!("must be 1 to {MAX_NAME} characters")));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(bad("must not start with '.' or '-'"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl AdapterStore {
    /// Opens (creating if needed) the store at `dir` and removes temporary files left by an
    /// interrupted install.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        for entry in std::fs::read_dir(dir).map_err(io)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(INCOMING) || name.starts_with(&format!(".{STATE}.tmp-")) {
                log::warn!("{}: removing an interrupted write", entry.path().display());
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(AdapterStore {
            dir: dir.to_path_buf(),
            max_bytes,
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The per-file size quota in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Where entry `name` lives (whether or not it exists).
    pub fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        check_name(name)?;
        Ok(self.dir.join(format!("{name}{SUFFIX}")))
    }

    /// Installs `bytes` as entry `name`: quota check, write to a temporary file, fsync,
    /// `verify` (which loads it, e.g. against the running base), rename into place, fsync of the
    /// directory. Replacing an entry that `state` uses is refused. Nothing changes on error.
    pub fn install(
        &self,
        name: &str,
        bytes: &[u8],
        state: &StoreState,
        verify: impl FnOnce(&Path) -> Result<Adapter, String>,
    ) -> Result<Adapter, StoreError> {
        let dest = self.path_of(name)?;
        if bytes.len() as u64 > self.max_bytes {
            return Err(StoreError::TooLarge {
                name: name.into(),
                bytes: bytes.len() as u64,
                quota: self.max_bytes,
            });
        }
        if let Some(role) = state.role_of(name) {
            return Err(StoreError::InUse {
                name: name.into(),
                role,
                hint: "install the new version under another name",
            });
        }
        let tmp = self
            .dir
            .join(format!("{INCOMING}{name}-{}", std::process::id()));
        let io = |source| StoreError::Io {
            path: tmp.clone(),
            source,
        };
        let result = (|| {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
            drop(f);
            let adapter = verify(&tmp).map_err(StoreError::Rejected)?;
            std::fs::rename(&tmp, &dest).map_err(|source| StoreError::Io {
                path: dest.clone(),
                source,
            })?;
            sync_dir(&self.dir);
            Ok(adapter)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Deletes entry `name`; refused while `state` uses it.
    pub fn remove(&self, name: &str, state: &StoreState) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        if let Some(role) = state.role_of(name) {
            return Err(StoreError::InUse {
                name: name.into(),
                role,
                hint: "activate another adapter (or deactivate) and wait for it to be committed first",
            });
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.dir);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(name.into()))
            }
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Loads entry `name` (full validation, no base check).
    pub fn load(&self, name: &str) -> Result<Adapter, StoreError> {
        let path = self.path_of(name)?;
        if !path.is_file() {
            return Err(StoreError::NotFound(name.into()));
        }
        Adapter::load(&path).map_err(|e| StoreError::Rejected(e.to_string()))
    }

    /// Every entry, sorted by name. Files that no longer load are listed with their error.
    pub fn list(&self) -> Result<Vec<Installed>, StoreError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut out: Vec<Installed> = entries
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                let name = file.strip_suffix(SUFFIX)?.to_string();
                check_name(&name).ok()?;
                let bytes = e.metadata().map_or(0, |m| m.len());
                Some(match Adapter::load(e.path()) {
                    Ok(a) => Installed {
                        name,
                        bytes,
                        sha256: a.sha256().into(),
                        adapter: a.header.name.clone(),
                        kind: a.header.kind.clone(),
                        error: None,
                    },
                    Err(err) => Installed {
                        name,
                        bytes,
                        sha256: String::new(),
                        adapter: String::new(),
                        kind: String::new(),
                        error: Some(err.to_string()),
                    },
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// Reads `state.json`; a missing file is the empty state. A file that does not parse (it
    /// cannot be torn, so this is outside damage) is set aside as `state.json.bad` and the empty
    /// state returned, with a warning.
    pub fn load_state(&self) -> Result<StoreState, StoreError> {
        let path = self.state_path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StoreState::default()),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        match serde_json::from_slice::<StoreState>(&text) {
            Ok(s) if s.version == STATE_VERSION => Ok(s),
            Ok(s) => {
                log::warn!(
                    "{}: state version {} is not {STATE_VERSION}; starting from the base model",
                    path.display(),
                    s.version
                );
                Ok(StoreState::default())
            }
            Err(e) => {
                let bad = self.dir.join(format!("{STATE}.bad"));
                log::warn!(
                    "{}: unreadable ({e}); moved to {} and starting from the base model",
                    path.display(),
                    bad.display()
                );
                let _ = std::fs::rename(&path, &bad);
                Ok(StoreState::default())
            }
        }
    }

    /// Replaces `state.json` atomically (temporary file, fsync, rename, directory fsync).
    pub fn save_state(&self, state: &StoreState) -> Result<(), StoreError> {
        let mut s = state.clone();
        s.version = STATE_VERSION;
        let mut bytes = serde_json::to_vec_pretty(&s).expect("state serialises");
        bytes.push(b'\n');
        let path = self.state_path();
        crate::fsutil::write_atomic(&path, &bytes).map_err(|source| StoreError::Io { path, source })
    }
}

impl StoreState {
    /// Whether entry `name` is the active adapter or the rollback target.
    pub fn role_of(&self, name: &str) -> Option<&'static str> {
        if self.active.contains(name) {
            Some("active")
        } else if self.last_good.contains(name) {
            Some("the last known good adapter (the rollback target)")
        } else if self.previous.contains(name) {
            Some("the previous adapter (what `rollback` returns to)")
        } else {
            None
        }
    }

    /// The state to start from: an uncommitted activation (the service stopped during
    /// probation) is rolled back to the last known good selection.
    pub fn recovered(&self) -> (StoreState, bool) {
        if self.probation {
            let s = StoreState {
                version: self.version,
                active: self.last_good.clone(),
                probation: false,
                last_good: self.last_good.clone(),
                previous: self.previous.clone(),
            };
            (s, true)
        } else {
            (self.clone(), false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("perch-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn sel(name: &str) -> Selection {
        Selection {
            name: name.into(),
            scale: 1.0,
            sha256: "00".into(),
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in ["osbs", "a.b-c_1", &"x".repeat(MAX_NAME)] {
            check_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "../x",
            "a/b",
            "a b",
            "é",
            "-rf",
            &"x".repeat(MAX_NAME + 1),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// `rollback` returns to `previous`: it is protected like the active and last good ones.
    #[test]
    fn the_rollback_targets_are_in_use() {
        let sel = |n: &str| {
            TaskSet(vec![Selection {
                name: n.into(),
                scale: 1.0,
                sha256: "00".into(),
            }])
        };
        let state = StoreState {
            version: 1,
            active: sel("a"),
            probation: false,
            last_good: sel("b"),
            previous: sel("c"),
        };
        for n in ["a", "b", "c"] {
            assert!(state.role_of(n).is_some(), "{n}");
        }
        assert!(state.role_of("d").is_none());
    }

    /// A task set is `null`, one object (as state files were before task sets) or an array.
    #[test]
    fn task_sets_read_every_form_and_write_the_shortest() {
        let one = |n: &str| Selection {
            name: n.into(),
            scale: 1.0,
            sha256: "00".into(),
        };
        for (json, set) in [
            ("null", TaskSet::default()),
            (
                r#"{"name":"a","scale":1.0,"sha256":"00"}"#,
                TaskSet(vec![one("a")]),
            ),
            (
                r#"[{"name":"a","scale":1.0,"sha256":"00"},{"name":"b","scale":1.0,"sha256":"00"}]"#,
                TaskSet(vec![one("a"), one("b")]),
            ),
        ] {
            assert_eq!(serde_json::from_str::<TaskSet>(json).unwrap(), set);
            assert_eq!(serde_json::to_string(&set).unwrap(), json);
        }
        let old: StoreState = serde_json::from_str(
            r#"{"version":1,"active":{"name":"a","scale":1.0,"sha256":"00"},"probation":false,"last_good":null}"#,
        )
        .unwrap();
        assert_eq!(old.active, TaskSet(vec![one("a")]));
        assert!(old.last_good.is_base() && old.previous.is_base());
        assert!(serde_json::from_str::<TaskSet>("7").is_err());
    }

    #[test]
    fn install_verify_remove_and_state() {
        let dir = tmpdir("ops");
        let store = AdapterStore::open(&dir, 1 << 20).unwrap();
        let real = std::fs::read("models/adapters/osbs-lora.safetensors").unwrap();
        let state = StoreState::default();
        let a = store
            .install("osbs", &real, &state, |p| {
                Adapter::load(p).map_err(|e| e.to_string())
            })
            .unwrap();
        assert!(dir.join("osbs.safetensors").is_file());
        // A refused file leaves no trace.
        let e = store
            .install("junk", b"not an adapter", &state, |p| {
                Adapter::load(p).map_err(|e| e.to_string())
            })
            .unwrap_err();
        assert!(e.to_string().contains("invalid"), "{e}");
        assert!(!dir.join("junk.safetensors").exists());
        let big = vec![0u8; (1 << 20) + 1];
        assert!(matches!(
            store.install("big", &big, &state, |_| unreachable!()),
            Err(StoreError::TooLarge { .. })
        ));
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].sha256, a.sha256());
        // In-use entries cannot be replaced or removed.
        let st = StoreState {
            active: TaskSet(vec![sel("osbs")]),
            ..Default::default()
        };
        assert!(matches!(
            store.install("osbs", &real, &st, |_| unreachable!()),
            Err(StoreError::InUse { .. })
        ));
        assert!(matches!(
            store.remove("osbs", &st),
            Err(StoreError::InUse { .. })
        ));
        store.save_state(&st).unwrap();
        assert_eq!(store.load_state().unwrap().active, st.active);
        store.remove("osbs", &StoreState::default()).unwrap();
        assert!(matches!(
            store.remove("osbs", &StoreState::default()),
            Err(StoreError::NotFound(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn interrupted_writes_are_cleaned_and_bad_state_set_aside() {
        let dir = tmpdir("crash");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(".incoming-osbs-123"), b"half").unwrap();
        std::fs::write(dir.join(".state.json.tmp-99"), b"{").unwrap();
        std::fs::write(dir.join("state.json"), b"{\"active\": 7").unwrap();
        let store = AdapterStore::open(&dir, 1 << 20).unwrap();
        assert!(!dir.join(".incoming-osbs-123").exists());
        assert!(!dir.join(".state.json.tmp-99").exists());
        assert_eq!(store.load_state().unwrap(), StoreState::default());
        assert!(dir.join("state.json.bad").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn uncommitted_activation_rolls_back() {
        let s = StoreState {
            version: STATE_VERSION,
            active: TaskSet(vec![sel("new")]),
            probation: true,
            last_good: TaskSet(vec![sel("old")]),
            previous: TaskSet::default(),
        };
        let (r, rolled) = s.recovered();
        assert!(rolled);
        assert_eq!(r.active, TaskSet(vec![sel("old")]));
        assert!(!r.probation);
        let committed = StoreState {
            probation: false,
            ..s
        };
        assert_eq!(committed.recovered(), (committed.clone(), false));
    }
}
