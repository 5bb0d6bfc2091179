//! Placeholder until the bench helper writes it.
fn main() {}
