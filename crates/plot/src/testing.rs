//! Checks on written PNG files, for tests of the crates that draw (feature `testing`):
//! the size and that something was drawn, not only that a file with PNG magic exists.

use std::path::Path;

/// Width, height and RGB pixels of an 8-bit PNG.
pub fn decode(path: &Path) -> (usize, usize, Vec<[u8; 3]>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).expect("open PNG"));
    let mut reader = png::Decoder::new(file).read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG frame");
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let step = info.color_type.samples();
    assert!(step >= 3, "{:?}", info.color_type);
    let px = buf[..info.buffer_size()]
        .chunks(step)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width as usize, info.height as usize, px)
}

/// Not blank: many colours, and ink in the plot area (below the 60-pixel title band).
pub fn assert_drawn(px: &[[u8; 3]], w: usize, h: usize) {
    let colours: std::collections::HashSet<[u8; 3]> = px.iter().copied().collect();
    assert!(colours.len() > 2, "{} colours", colours.len());
    let area = &px[60 * w..h * w];
    let inked = area.iter().filter(|p| **p != [255, 255, 255]).count();
    assert!(
        inked * 200 > area.len(),
        "nearly blank: {inked} of {} pixels drawn",
        area.len()
    );
}

/// Whether the image has a pixel of the `i`-th line (or class) colour.
pub fn has_colour(px: &[[u8; 3]], i: usize) -> bool {
    let c = crate::color(i);
    px.iter().any(|p| *p == [c.0, c.1, c.2])
}
