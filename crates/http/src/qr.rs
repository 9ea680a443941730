//! QR codes of `otpauth://` URIs for enrolment screens, as SVG and as PNG.

use qrcode::QrCode;
use qrcode::render::svg;

/// Pixels per QR module in the PNG.
const SCALE: usize = 6;
/// Modules of white border (the standard asks for 4).
const QUIET: usize = 4;

/// An SVG document of the QR code of `text`.
pub fn svg(text: &str) -> Option<String> {
    let code = QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<svg::Color<'_>>()
            .min_dimensions(200, 200)
            .quiet_zone(true)
            .build(),
    )
}

/// A PNG (8-bit greyscale) of the QR code of `text`.
pub fn png(text: &str) -> Option<Vec<u8>> {
    let code = QrCode::new(text.as_bytes()).ok()?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for (index, color) in colors.iter().enumerate() {
        if *color != qrcode::Color::Dark {
            continue;
        }
        let (mx, my) = (index % modules + QUIET, index / modules + QUIET);
        for dy in 0..SCALE {
            let row = (my * SCALE + dy) * side;
            for dx in 0..SCALE {
                if let Some(p) = pixels.get_mut(row + mx * SCALE + dx) {
                    *p = 0;
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let side = u32::try_from(side).ok()?;
        let mut encoder = png::Encoder::new(&mut out, side, side);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().ok()?;
        writer.write_image_data(&pixels).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_renderings_are_well_formed() {
        let uri = "otpauth://totp/otpgate:ali?secret=GEZDGNBVGY3TQOJQ&issuer=otpgate";
        let svg = svg(uri).unwrap_or_default();
        assert!(svg.starts_with("<?xml") && svg.contains("<svg"), "{svg}");
        let png = png(uri).unwrap_or_default();
        assert_eq!(png.get(..8), Some(&b"\x89PNG\r\n\x1a\n"[..]));
    }
}
