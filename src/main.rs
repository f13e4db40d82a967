fn main() -> std::process::ExitCode {
    cbtfs::cli::main()
}
