use clap::Parser;

fn main() {
    tune_allocator();
    let cli = bitsync::cli::Cli::parse();
    bitsync::cli::logs::init(&cli);
    if let Err(e) = bitsync::cli::run(&cli) {
        eprintln!("bitsync: {e}");
        std::process::exit(e.exit_code());
    }
}

/// Keep chunk-sized buffers (up to a few MiB) on the heap and keep freed heap
/// space for the next chunk. By default glibc serves them with fresh `mmap`s
/// or trims the heap after each is freed, so every chunk read, sent or
/// received costs a page fault and a zeroed page per 4 KiB: a serving node
/// took 128k faults per GiB sent, 17k with this. What stays retained is
/// bounded by the trim threshold per arena, and arenas by the core count
/// (glibc's default is 8 per core): the serving node's peak RSS fell too
/// (docs/BENCHMARKS.md, replication).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let arenas = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        // SAFETY: mallopt only sets allocator parameters; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
            libc::mallopt(libc::M_ARENA_MAX, arenas as libc::c_int);
        }
    }
}
