//! The BuildJob controller.
