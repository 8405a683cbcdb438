//! The Project controller.
