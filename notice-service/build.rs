//! `sqlx::migrate!` embeds the migrations at compile time, and cargo does not see the files it
//! reads: without this, a new migration would not be built in until some source file changed.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
