//! A deterministic moving test pattern for tests and demos without a camera.
//!
//! Frame `n` shows a diagonal gradient, three solid squares moving on known paths
//! ([`objects_at`]) and `n` itself as 32 black/white 8x8 blocks along the top edge
//! (most significant bit first), so a consumer can tell which frame it got ([`read_index`]).

use super::{FrameSource, SourceError};
use crate::frame::RgbFrame;

/// Side of one bit block of the frame index, in pixels.
const BIT: usize = 8;

/// The synthetic source: frame `n` is a pure function of `n` and the size.
pub struct Synthetic {
    size: (usize, usize),
    next: u64,
}

impl Synthetic {
    /// A pattern of `(width, height)` pixels (at least 256x64, so the index fits).
    pub fn new(size: (usize, usize)) -> Self {
        Synthetic {
            size: (size.0.max(256), size.1.max(64)),
            next: 0,
        }
    }
}

/// Square colours, in the order of [`objects_at`].
pub const COLOURS: [[u8; 3]; 3] = [[220, 40, 40], [40, 200, 60], [40, 80, 230]];

/// The boxes `[x1, y1, x2, y2]` (pixels, exclusive end) of the squares in frame `n`.
pub fn objects_at(n: u64, width: usize, height: usize) -> Vec<[usize; 4]> {
    let side = (width.min(height) / 6).max(8);
    (0..3u64)
        .map(|k| {
            let span_x = (width - side) as u64;
            let span_y = (height - 2 * BIT - side) as u64;
            // Triangle waves with different speeds, so the squares cross each other.
            let tri = |t: u64, span: u64| {
                if span == 0 {
                    return 0;
                }
                let p = t % (2 * span);
                (if p > span { 2 * span - p } else { p }) as usize
            };
            let x = tri(n * (3 + 2 * k) + k * 97, span_x);
            let y = 2 * BIT + tri(n * (2 + k) + k * 53, span_y);
            [x, y, x + side, y + side]
        })
        .collect()
}

/// Renders frame `n`.
pub fn render(n: u64, width: usize, height: usize) -> RgbFrame {
    let mut data = vec![0u8; width * height * 3];
    for y in 0..height {
        for x in 0..width {
            let i = (y * width + x) * 3;
            data[i] = (x * 255 / width) as u8 / 2 + 40;
            data[i + 1] = (y * 255 / height) as u8 / 2 + 40;
            data[i + 2] = 100;
        }
    }
    let mut fill = |b: [usize; 4], c: [u8; 3]| {
        for y in b[1]..b[3].min(height) {
            for x in b[0]..b[2].min(width) {
                let i = (y * width + x) * 3;
                data[i..i + 3].copy_from_slice(&c);
            }
        }
    };
    for (b, c) in objects_at(n, width, height).into_iter().zip(COLOURS) {
        fill(b, c);
    }
    for bit in 0..32 {
        let on = (n >> (31 - bit)) & 1 == 1;
        let v = if on { 255 } else { 0 };
        fill([bit * BIT, 0, (bit + 1) * BIT, BIT], [v; 3]);
    }
    RgbFrame::new(width, height, data).expect("synthetic frame geometry is valid")
}

/// Reads the frame index written by [`render`], tolerating lossy compression (each block is
/// judged by its centre pixel). `None` if the frame is too small.
pub fn read_index(frame: &RgbFrame) -> Option<u64> {
    if frame.width() < 32 * BIT || frame.height() < BIT {
        return None;
    }
    let row = frame.row(BIT / 2);
    Some((0..32).fold(0u64, |acc, bit| {
        let x = bit * BIT + BIT / 2;
        let px = &row[x * 3..x * 3 + 3];
        let lum: u32 = px.iter().map(|&v| u32::from(v)).sum();
        (acc << 1) | u64::from(lum > 3 * 128)
    }))
}

impl FrameSource for Synthetic {
    fn next_frame(&mut self) -> Result<Option<RgbFrame>, SourceError> {
        let f = render(self.next, self.size.0, self.size.1);
        self.next += 1;
        Ok(Some(f))
    }

    fn describe(&self) -> String {
        format!("synthetic {}x{}", self.size.0, self.size.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips_and_objects_are_drawn() {
        for n in [0u64, 1, 77, 0xdead_beef] {
            let f = render(n, 320, 240);
            assert_eq!(read_index(&f), Some(n));
            for (b, c) in objects_at(n, 320, 240).iter().zip(COLOURS) {
                assert!(b[2] <= 320 && b[3] <= 240 && b[1] >= 16, "{b:?}");
                let cy = (b[1] + b[3]) / 2;
                let cx = (b[0] + b[2]) / 2;
                // The last square drawn is on top where they overlap; check the top one fully.
                if c == COLOURS[2] {
                    assert_eq!(&f.row(cy)[cx * 3..cx * 3 + 3], &c);
                }
            }
        }
        assert_ne!(objects_at(0, 320, 240), objects_at(5, 320, 240));
    }
}
