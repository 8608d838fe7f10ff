//! Steps that talk to a server's hardware: its BMC (Redfish, IPMI) and,
//! over SSH, its operating system; and libvirt domains, through `virsh`.

mod bmcs;
mod ipmi;
mod process;
mod reboot;
mod redfish;
mod ssh;
mod tls;
mod vm;

troupe_sdk::export_steps! {
    "bmc_power" => redfish::power,
    "ssh_run" => ssh::run,
    "ssh_reboot" => ssh::reboot,
    "vm_power" => vm::vm,
}
