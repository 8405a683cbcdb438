//! Shared VM capacity: a CloudProvider's `maxInstances`, first come first served.
