//! tetherctl client (WIP)
