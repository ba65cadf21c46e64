//! Still images replayed as a stream: a directory's .jpg/.jpeg/.png files or a glob pattern,
//! in name order.

use std::path::PathBuf;

use super::{FrameSource, SourceError};
use crate::frame::RgbFrame;
use crate::image_io::{list_images, load_rgb};

/// Image files played in order; unreadable files are skipped with a warning.
pub struct ImageFiles {
    name: String,
    files: Vec<PathBuf>,
    /// The files as records name them.
    origins: Vec<std::sync::Arc<str>>,
    /// Index of the file the last frame came from.
    last: Option<usize>,
    next: usize,
    looped: bool,
    skipped: usize,
}

impl ImageFiles {
    /// Lists `pattern` (a directory or a glob). Fails if it names no image.
    pub fn open(pattern: &str, looped: bool) -> Result<Self, SourceError> {
        let name = format!("images:{pattern}");
        let fail = |reason: String| SourceError::fatal(name.clone(), reason);
        let path = std::path::Path::new(pattern);
        let files = if path.is_dir() {
            list_images(path).map_err(|e| fail(format!("cannot list directory: {e}")))?
        } else {
            let mut files: Vec<PathBuf> = glob::glob(pattern)
                .map_err(|e| fail(format!("bad glob pattern: {e}")))?
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            files
        };
        if files.is_empty() {
            return Err(fail("no image files found".into()));
        }
        Ok(ImageFiles {
            name,
            origins: files
                .iter()
                .map(|p| p.display().to_string().into())
                .collect(),
            last: None,
            files,
            next: 0,
            looped,
            skipped: 0,
        })
    }

    /// How many files matched.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Always false: opening fails when nothing matches.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl FrameSource for ImageFiles {
    fn next_frame(&mut self) -> Result<Option<RgbFrame>, SourceError> {
        loop {
            if self.next == self.files.len() {
                if !self.looped {
                    return Ok(None);
                }
                if self.skipped == self.files.len() {
                    return Err(SourceError::fatal(
                        &self.name,
                        "no file is a readable image",
                    ));
                }
                self.next = 0;
                self.skipped = 0;
            }
            let path = &self.files[self.next];
            self.next += 1;
            match load_rgb(path) {
                Ok(f) => {
                    self.last = Some(self.next - 1);
                    return Ok(Some(f));
                }
                Err(e) => {
                    log::warn!("{}: skipping {e}", self.name);
                    self.skipped += 1;
                }
            }
        }
    }

    fn describe(&self) -> String {
        format!("{} ({} files)", self.name, self.files.len())
    }

    fn frame_origin(&self) -> Option<std::sync::Arc<str>> {
        self.last.map(|i| self.origins[i].clone())
    }
}
