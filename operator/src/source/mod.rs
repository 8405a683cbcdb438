//! Where the code comes from: reading `stagely.yaml` at a commit without cloning the whole
//! repository.
