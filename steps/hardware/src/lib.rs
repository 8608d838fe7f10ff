//! Steps that talk to a server's hardware: its BMC (Redfish, IPMI) and,
//! over SSH, its operating system.

mod bmcs;
mod ipmi;
mod process;
mod reboot;
mod redfish;
mod ssh;
mod tls;

troupe_sdk::export_steps! {
    "bmc_power" => redfish::power,
    "ssh_run" => ssh::run,
    "ssh_reboot" => ssh::reboot,
}
