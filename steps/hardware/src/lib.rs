//! Steps that talk to a server's hardware: its BMC (Redfish now; IPMI, SSH
//! and libvirt later).

mod bmcs;
mod redfish;
mod tls;

troupe_sdk::export_steps! {
    "redfish_power" => redfish::power,
}
