//! Bakes the git SHA, build date and version into the binary.
fn main() {
    lockstep_build::emit();
}
