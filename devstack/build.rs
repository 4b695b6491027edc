//! Rebuilds devstack when a migration is added: `embed_migrations!` reads
//! the directory at compile time, and Cargo would not otherwise notice a
//! new file in it.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
