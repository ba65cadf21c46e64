//! Drawing detections with `embedded-graphics` on any `DrawTarget<Color = Rgb888>`, and
//! [`RgbCanvas`], a draw target over an [`RgbFrame`] of any size.

use embedded_graphics::mono_font::{MonoTextStyle, ascii::FONT_6X10};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{PrimitiveStyleBuilder, Rectangle, StrokeAlignment};
use embedded_graphics::text::{Baseline, Text};

use crate::frame::RgbFrame;
use crate::postprocess::Detection;

/// A draw target over a frame's pixels. Pixels outside the frame are dropped, as the
/// `DrawTarget` contract requires.
pub struct RgbCanvas<'a> {
    frame: &'a mut RgbFrame,
}

impl<'a> RgbCanvas<'a> {
    pub fn new(frame: &'a mut RgbFrame) -> Self {
        RgbCanvas { frame }
    }
}

impl OriginDimensions for RgbCanvas<'_> {
    fn size(&self) -> Size {
        Size::new(self.frame.width() as u32, self.frame.height() as u32)
    }
}

impl DrawTarget for RgbCanvas<'_> {
    type Color = Rgb888;
    type Error = core::convert::Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let (w, h, stride) = (self.frame.width(), self.frame.height(), self.frame.stride());
        let data = self.frame.data_mut();
        for Pixel(p, c) in pixels {
            if p.x >= 0 && p.y >= 0 && (p.x as usize) < w && (p.y as usize) < h {
                let i = p.y as usize * stride + p.x as usize * 3;
                data[i..i + 3].copy_from_slice(&[c.r(), c.g(), c.b()]);
            }
        }
        Ok(())
    }

    fn fill_solid(&mut self, area: &Rectangle, color: Self::Color) -> Result<(), Self::Error> {
        let area = area.intersection(&self.bounding_box());
        let Some(br) = area.bottom_right() else {
            return Ok(());
        };
        let stride = self.frame.stride();
        let data = self.frame.data_mut();
        for y in area.top_left.y..=br.y {
            let row = y as usize * stride;
            for x in area.top_left.x..=br.x {
                let i = row + x as usize * 3;
                data[i..i + 3].copy_from_slice(&[color.r(), color.g(), color.b()]);
            }
        }
        Ok(())
    }
}

/// The Ultralytics colour palette, indexed by class id modulo its length.
const PALETTE: [u32; 20] = [
    0xFF3838, 0xFF9D97, 0xFF701F, 0xFFB21D, 0xCFD231, 0x48F90A, 0x92CC17, 0x3DDB86, 0x1A9334,
    0x00D4BB, 0x2C99A8, 0x00C2FF, 0x344593, 0x6473FF, 0x0018EC, 0x8438FF, 0x520085, 0xCB38FF,
    0xFF95C8, 0xFF37C7,
];

/// The box colour of a class.
pub fn class_color(class_id: usize) -> Rgb888 {
    let c = PALETTE[class_id % PALETTE.len()];
    Rgb888::new((c >> 16) as u8, (c >> 8) as u8, c as u8)
}

/// Draws each detection (frame pixels) as a 2-px box with a `label score` tag above it (inside
/// the box when there is no room above). Labels default to `class<N>` for unknown ids.
pub fn draw_detections<D>(
    target: &mut D,
    dets: &[Detection],
    labels: &[String],
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb888>,
{
    let font = &FONT_6X10;
    for d in dets {
        let color = class_color(d.class_id);
        let [x1, y1, x2, y2] = d.bbox.map(|v| v.round() as i32);
        let rect = Rectangle::with_corners(Point::new(x1, y1), Point::new(x2.max(x1), y2.max(y1)));
        let style = PrimitiveStyleBuilder::new()
            .stroke_color(color)
            .stroke_width(2)
            .stroke_alignment(StrokeAlignment::Inside)
            .build();
        rect.into_styled(style).draw(target)?;
        let label = labels
            .get(d.class_id)
            .cloned()
            .unwrap_or_else(|| format!("class{}", d.class_id));
        let text = format!("{label} {:.2}", d.score);
        let tw = text.len() as u32 * font.character_size.width + 2;
        let th = font.character_size.height + 2;
        let ty = if y1 >= th as i32 { y1 - th as i32 } else { y1 };
        let tag = Rectangle::new(Point::new(x1, ty), Size::new(tw, th));
        target.fill_solid(&tag, color)?;
        let ink = if (color.r() as u32 * 299 + color.g() as u32 * 587 + color.b() as u32 * 114)
            > 128_000
        {
            Rgb888::BLACK
        } else {
            Rgb888::WHITE
        };
        Text::with_baseline(
            &text,
            Point::new(x1 + 1, ty + 1),
            MonoTextStyle::new(font, ink),
            Baseline::Top,
        )
        .draw(target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ascii(frame: &RgbFrame) -> Vec<String> {
        (0..frame.height())
            .map(|y| {
                frame
                    .row(y)
                    .chunks(3)
                    .map(|p| if p == [0, 0, 0] { '.' } else { '#' })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn box_outline_is_drawn_inside_and_clipped() {
        let mut f = RgbFrame::filled(8, 6, [0, 0, 0]);
        let det = Detection {
            class_id: 0,
            score: 0.5,
            bbox: [1.0, 1.0, 6.0, 4.0],
        };
        let mut c = RgbCanvas::new(&mut f);
        let style = PrimitiveStyleBuilder::new()
            .stroke_color(Rgb888::RED)
            .stroke_width(1)
            .build();
        let [x1, y1, x2, y2] = det.bbox.map(|v| v as i32);
        Rectangle::with_corners(Point::new(x1, y1), Point::new(x2, y2))
            .into_styled(style)
            .draw(&mut c)
            .unwrap();
        // A rectangle partly outside the frame must not panic.
        Rectangle::new(Point::new(6, 4), Size::new(10, 10))
            .into_styled(style)
            .draw(&mut c)
            .unwrap();
        assert_eq!(
            ascii(&f),
            vec![
                "........", ".######.", ".#....#.", ".#....#.", ".#######", "......#.",
            ]
        );
    }

    #[test]
    fn detections_draw_box_color_and_label() {
        let mut f = RgbFrame::filled(64, 40, [0, 0, 0]);
        let det = Detection {
            class_id: 0,
            score: 0.87,
            bbox: [10.0, 20.0, 50.0, 39.0],
        };
        draw_detections(&mut RgbCanvas::new(&mut f), &[det], &["Tree".into()]).unwrap();
        let red = class_color(0);
        let px = |x: usize, y: usize| f.row(y)[x * 3..x * 3 + 3].to_vec();
        assert_eq!(px(10, 30), vec![red.r(), red.g(), red.b()], "left edge");
        assert_eq!(px(30, 30), vec![0, 0, 0], "box interior untouched");
        // The tag sits above the box: 12 px high starting at y = 8, filled with the class colour
        // except where glyphs are drawn.
        let tag: Vec<Vec<u8>> = (8..20)
            .flat_map(|y| (10..60).map(move |x| (x, y)))
            .map(|(x, y)| px(x, y))
            .collect();
        assert!(
            tag.iter()
                .filter(|p| **p == vec![red.r(), red.g(), red.b()])
                .count()
                > tag.len() / 2
        );
        assert!(
            tag.iter()
                .any(|p| *p == vec![255, 255, 255] || *p == vec![0, 0, 0]),
            "text drawn"
        );
        assert_eq!(px(5, 5), vec![0, 0, 0]);
    }
}
