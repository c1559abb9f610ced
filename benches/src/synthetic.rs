//! Synthetic inputs of a chosen length: a hotel review repeated to `words` words, with a
//! distinct first word per variant (same token count, different input).

/// The review the inputs are cut from.
pub const PARAGRAPH: &str = "The hotel sits on a quiet street a short walk from the old town and the river. \
Our room was small but clean, the bed was comfortable and the staff at the front desk were friendly \
and quick to help with directions, restaurant tips and a late checkout. Breakfast had fresh bread, \
fruit, eggs cooked to order and strong coffee, although the dining room got crowded after eight. \
The walls were thin, so we heard the neighbours and some traffic in the early morning, and the \
shower took a while to run hot. Prices were fair for the location and we would stay again, \
especially for a short city break when being close to museums, markets and the station matters \
more than a large room or a view.";

/// `words` words of [`PARAGRAPH`], the first replaced by `v<variant>`.
pub fn text_of(words: usize, variant: usize) -> String {
    let base: Vec<&str> = PARAGRAPH.split_whitespace().collect();
    let mut out: Vec<String> = (0..words)
        .map(|i| base[i % base.len()].to_string())
        .collect();
    // a distinct first word per variant keeps the token count and changes the input
    out[0] = format!("v{variant}");
    out.join(" ")
}
