//! The PNG route of the compare chart: plotters draws shapes into an RGB
//! buffer ([`BitMapBackend`]), [`Labeled`] draws text into it with
//! `ab_glyph` from a TrueType font read at run time, and `png` encodes the
//! buffer.
//!
//! Why not plotters' own text: its bitmap text needs the `ttf` feature
//! (font-kit, which links fontconfig and freetype: system packages) or the
//! `ab_glyph` feature, which replaces the font-free text layout of the
//! whole crate, so every SVG chart would then fail without a registered font.
//! Rasterizing text in this backend keeps SVG charts font-free and needs
//! nothing but a font file at run time. Without one, the PNG has no text
//! (the SVG still has all of it) and the caller says so.

use std::path::{Path, PathBuf};

use ab_glyph::{Font, FontVec, ScaleFont};
use anyhow::{Context, Result};
use plotters::backend::{BitMapBackend, RGBPixel};
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind,
};

/// Where common distributions keep a sans-serif TrueType font, in order of
/// preference (DejaVu Sans: Debian/Ubuntu, Fedora, Arch; then Liberation).
pub const FONT_PATHS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];
/// Largest font file read: DejaVu Sans is 740 KiB; 32 MiB covers any
/// single-face font without reading a mistaken path's gigabytes.
const FONT_BYTES_MAX: u64 = 32 << 20;

/// A font for the PNG's text, and where it came from.
pub struct LoadedFont {
    /// The parsed font.
    pub font: FontVec,
    /// Its file.
    pub path: PathBuf,
}

impl std::fmt::Debug for LoadedFont {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedFont")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Reads and parses one font file.
pub fn load_font(path: &Path) -> Result<LoadedFont> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read font {}", path.display()))?
        .len();
    if len > FONT_BYTES_MAX {
        anyhow::bail!(
            "font {} is {len} bytes, over the {FONT_BYTES_MAX}-byte cap",
            path.display()
        );
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read font {}", path.display()))?;
    let font = FontVec::try_from_vec(bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a usable font: {e}", path.display()))?;
    Ok(LoadedFont {
        font,
        path: path.to_path_buf(),
    })
}

/// The font at `explicit` (an error if unusable), else the first of
/// [`FONT_PATHS`] that loads, else `None`.
pub fn find_font(explicit: Option<&Path>) -> Result<Option<LoadedFont>> {
    if let Some(p) = explicit {
        return load_font(p).map(Some);
    }
    Ok(FONT_PATHS.iter().find_map(|p| load_font(Path::new(p)).ok()))
}

/// A bitmap backend whose text is drawn with `font`, or not at all.
pub struct Labeled<'a, 'f> {
    inner: BitMapBackend<'a, RGBPixel>,
    font: Option<&'f FontVec>,
}

impl<'a, 'f> Labeled<'a, 'f> {
    /// Draws into `buf`, 3 bytes (RGB) per pixel, row by row.
    pub fn new(buf: &'a mut [u8], size: (u32, u32), font: Option<&'f FontVec>) -> Self {
        Labeled {
            inner: BitMapBackend::with_buffer(buf, size),
            font,
        }
    }
}

/// Width and height of `text` set in `font` at `size` px, and its ascent.
fn text_box(font: &FontVec, size: f64, text: &str) -> (f32, f32, f32) {
    let f = font.as_scaled(size as f32);
    let mut width = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            width += f.kern(p, id);
        }
        width += f.h_advance(id);
        prev = Some(id);
    }
    (width, f.ascent() - f.descent(), f.ascent())
}

type DrawResult<E> = Result<(), DrawingErrorKind<E>>;

impl DrawingBackend for Labeled<'_, '_> {
    type ErrorType = <BitMapBackend<'static, RGBPixel> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> DrawResult<Self::ErrorType> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> DrawResult<Self::ErrorType> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> DrawResult<Self::ErrorType> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<T: BackendTextStyle>(
        &self,
        text: &str,
        style: &T,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        match self.font {
            Some(font) => {
                let (w, h, _) = text_box(font, style.size(), text);
                Ok((w.ceil() as u32, h.ceil() as u32))
            }
            // plotters' font-free estimate, as the SVG backend uses.
            None => self.inner.estimate_text_size(text, style),
        }
    }

    /// Lays `text` out as plotters' default does (anchor, then rotation
    /// about `pos`) and blends each glyph's coverage into the buffer.
    fn draw_text<T: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &T,
        pos: BackendCoord,
    ) -> DrawResult<Self::ErrorType> {
        let Some(font) = self.font else {
            return Ok(());
        };
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let (w, h, ascent) = text_box(font, style.size(), text);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0.0,
            HPos::Center => -w / 2.0,
            HPos::Right => -w,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0.0,
            VPos::Center => -h / 2.0,
            VPos::Bottom => -h,
        };
        let trans = style.transform();
        let scaled = font.as_scaled(style.size() as f32);
        let mut caret = 0.0;
        let mut prev = None;
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(p) = prev {
                caret += scaled.kern(p, id);
            }
            prev = Some(id);
            let glyph = id
                .with_scale_and_position(scaled.scale(), ab_glyph::point(caret + dx, ascent + dy));
            caret += scaled.h_advance(id);
            let Some(outline) = font.outline_glyph(glyph) else {
                continue; // a space
            };
            let b = outline.px_bounds();
            let mut pixels = Vec::new();
            outline.draw(|x, y, coverage| {
                if coverage > 0.0 {
                    pixels.push((
                        b.min.x as i32 + x as i32,
                        b.min.y as i32 + y as i32,
                        coverage,
                    ));
                }
            });
            for (x, y, coverage) in pixels {
                let (x, y) = trans.transform(x, y);
                self.inner.draw_pixel(
                    (pos.0 + x, pos.1 + y),
                    BackendColor {
                        alpha: color.alpha * f64::from(coverage.min(1.0)),
                        rgb: color.rgb,
                    },
                )?;
            }
        }
        Ok(())
    }
}

/// Writes an RGB buffer of `size` as a PNG file.
pub fn write_png(path: &Path, rgb: &[u8], size: (u32, u32)) -> Result<()> {
    // The buffer is the backend's: 3 bytes a pixel, no padding.
    assert_eq!(rgb.len(), size.0 as usize * size.1 as usize * 3);
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), size.0, size.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .with_context(|| format!("cannot write {}", path.display()))?;
    w.write_image_data(rgb)
        .with_context(|| format!("cannot write {}", path.display()))?;
    w.finish()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::prelude::*;

    /// Non-white pixels of a buffer.
    fn inked(buf: &[u8]) -> usize {
        buf.chunks(3).filter(|p| p != &[255, 255, 255]).count()
    }

    fn draw(font: Option<&FontVec>) -> Vec<u8> {
        let size = (200, 100);
        let mut buf = vec![0u8; 200 * 100 * 3];
        {
            let root = Labeled::new(&mut buf, size, font).into_drawing_area();
            root.fill(&WHITE).unwrap();
            root.draw(&Text::new(
                "Ferry 123",
                (10, 10),
                ("sans-serif", 20).into_font(),
            ))
            .unwrap();
            let rotated = ("sans-serif", 14)
                .into_font()
                .transform(FontTransform::Rotate270);
            root.draw(&Text::new("up", (180, 90), rotated)).unwrap();
            root.present().unwrap();
        }
        buf
    }

    #[test]
    fn without_a_font_text_is_skipped_not_an_error() {
        assert_eq!(inked(&draw(None)), 0);
    }

    #[test]
    fn with_a_font_text_is_drawn_where_asked() {
        let Some(f) = find_font(None).unwrap() else {
            eprintln!("skipped: none of {FONT_PATHS:?} is here");
            return;
        };
        let buf = draw(Some(&f.font));
        assert!(inked(&buf) > 100, "only {} pixels inked", inked(&buf));
        // Left-top anchored at (10, 10): nothing above row 10 or left of
        // column 10 except the rotated label near the right edge.
        for y in 0..10 {
            for x in 0..150 {
                let i = (y * 200 + x) * 3;
                assert_eq!(&buf[i..i + 3], &[255, 255, 255], "pixel {x},{y}");
            }
        }
        let (w, h, _) = text_box(&f.font, 20.0, "Ferry 123");
        assert!(w > 60.0 && w < 140.0 && h > 15.0 && h < 30.0, "{w}x{h}");
    }

    #[test]
    fn bad_fonts_are_refused() {
        let dir = crate::procs::TempDir::new().unwrap();
        let p = dir.path().join("x.ttf");
        std::fs::write(&p, b"not a font").unwrap();
        let e = find_font(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("not a usable font"), "{e}");
        assert!(find_font(Some(&dir.path().join("none.ttf"))).is_err());
    }

    #[test]
    fn writes_a_png() {
        let dir = crate::procs::TempDir::new().unwrap();
        let p = dir.path().join("x.png");
        write_png(&p, &draw(None), (200, 100)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let info = dec.read_info().unwrap().info().clone();
        assert_eq!((info.width, info.height), (200, 100));
    }
}
