//! Bakes the git SHA and build date that `lockstep --version` shows.
fn main() {
    lockstep_build::emit();
}
