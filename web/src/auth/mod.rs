//! Admin authentication: password hashing (and, in submodules, sessions and login).

pub mod password;
