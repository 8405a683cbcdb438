//! The Environment controller.
