//! troupe's end-to-end suite: one test binary, a module per area. Each test
//! runs a real `troupe serve` process over loopback HTTP, against SQLite and
//! against MariaDB (`tests/run` starts one and sets `TROUPE_TEST_MYSQL`).

mod harness;

mod access;
mod actions;
mod admin_tokens;
mod audit;
mod authors;
mod bad_input;
mod bench;
mod boundary;
mod bundles;
mod cancel;
mod cli;
mod cli_snapshots;
mod dbrestart;
mod drain;
mod faults;
mod files;
mod galera;
mod goons;
mod hardware_placement;
mod hostile;
mod hostile_bundles;
mod lease;
mod limits;
mod lists;
mod logs;
mod manual;
mod masking;
mod node_ops;
mod node_promises;
mod nodes;
mod openapi;
mod outcomes;
mod placement;
mod power;
mod profiles;
mod promises;
mod readme;
mod recovery;
mod reload;
mod replica;
mod servers;
mod shared_config;
mod targets;
mod tidy;
mod tls;
