//! `tetherctl`: the command-line client of the northbound API (`tether_gateway::tools::ctl`).

fn main() -> std::process::ExitCode {
    tether_gateway::tools::ctl::cli::main()
}
