//! dev command (WIP)
