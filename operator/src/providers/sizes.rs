//! Size × architecture → instance type, for each cloud.
//!
//! AWS and DigitalOcean use fixed tables (current families; Graviton for arm64). Hetzner renames
//! its server types often, so its type is chosen at run time from `/server_types`.

use stagely_api::v1alpha1::{Platform, Size};

use super::ProviderError;

/// The EC2 instance type for a size and architecture.
pub fn aws_instance_type(size: Size, platform: Platform) -> &'static str {
    match (size, platform) {
        (Size::Small, Platform::LinuxAmd64) => "t3.small",
        (Size::Small, Platform::LinuxArm64) => "t4g.small",
        (Size::Medium, Platform::LinuxAmd64) => "c7i.xlarge",
        (Size::Medium, Platform::LinuxArm64) => "c7g.xlarge",
        (Size::Large, Platform::LinuxAmd64) => "c7i.2xlarge",
        (Size::Large, Platform::LinuxArm64) => "c7g.2xlarge",
    }
}

/// The droplet size slug; DigitalOcean has no arm64 droplets.
pub fn digitalocean_size(size: Size, platform: Platform) -> Result<&'static str, ProviderError> {
    if platform == Platform::LinuxArm64 {
        return Err(ProviderError::Unsupported(
            "DigitalOcean has no arm64 droplets: build linux/arm64 through an aws or hetzner CloudProvider".into(),
        ));
    }
    Ok(match size {
        Size::Small => "s-2vcpu-4gb",
        Size::Medium => "c-4",
        Size::Large => "c-8",
    })
}

/// The least a size must offer: (vCPUs, GiB of memory).
pub fn minimum(size: Size) -> (u32, f64) {
    match size {
        Size::Small => (2, 4.0),
        Size::Medium => (4, 8.0),
        Size::Large => (8, 16.0),
    }
}

/// A Hetzner server type, as `/server_types` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct HetznerServerType {
    /// Its name, e.g. `cpx31`.
    pub name: String,
    /// vCPUs.
    pub cores: u32,
    /// Memory in GB.
    pub memory: f64,
    /// `x86` or `arm`.
    pub architecture: String,
    /// Whether Hetzner has retired it.
    pub deprecated: bool,
    /// Hourly gross price in EUR per location where it is offered.
    pub prices: Vec<(String, f64)>,
}

/// The cheapest current server type of the right architecture, offered in `location`, that
/// meets the size's minimum (arm64 lands on the CAX family, the only arm one).
pub fn hetzner_server_type<'a>(
    types: &'a [HetznerServerType],
    size: Size,
    platform: Platform,
    location: &str,
) -> Result<&'a HetznerServerType, ProviderError> {
    let architecture = match platform {
        Platform::LinuxAmd64 => "x86",
        Platform::LinuxArm64 => "arm",
    };
    let (cores, memory) = minimum(size);
    types
        .iter()
        .filter(|t| t.architecture == architecture && !t.deprecated && t.cores >= cores && t.memory >= memory)
        .filter_map(|t| t.prices.iter().find(|(loc, _)| loc == location).map(|(_, price)| (t, *price)))
        .min_by(|(a, pa), (b, pb)| pa.total_cmp(pb).then(a.cores.cmp(&b.cores)))
        .map(|(t, _)| t)
        .ok_or_else(|| {
            ProviderError::Unsupported(format!(
                "Hetzner offers no {architecture} server type with at least {cores} vCPUs and {memory} GB in {location} for size {size}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_uses_graviton_for_arm64() {
        for size in Size::ALL {
            assert!(aws_instance_type(size, Platform::LinuxArm64).contains("g."), "{size}");
            assert!(!aws_instance_type(size, Platform::LinuxAmd64).contains("g."), "{size}");
        }
        assert_eq!(aws_instance_type(Size::Medium, Platform::LinuxAmd64), "c7i.xlarge");
    }

    #[test]
    fn digitalocean_refuses_arm64_clearly() {
        assert_eq!(digitalocean_size(Size::Large, Platform::LinuxAmd64).unwrap(), "c-8");
        let err = digitalocean_size(Size::Small, Platform::LinuxArm64).unwrap_err();
        assert!(err.to_string().starts_with("DigitalOcean has no arm64 droplets"), "{err}");
    }

    fn hetzner(name: &str, cores: u32, memory: f64, arch: &str, deprecated: bool, price: f64) -> HetznerServerType {
        HetznerServerType {
            name: name.into(),
            cores,
            memory,
            architecture: arch.into(),
            deprecated,
            prices: vec![("fsn1".into(), price), ("hel1".into(), price * 1.1)],
        }
    }

    #[test]
    fn hetzner_picks_the_cheapest_current_type_that_fits() {
        let types = vec![
            hetzner("cx22", 2, 4.0, "x86", true, 0.005),
            hetzner("cx23", 2, 4.0, "x86", false, 0.006),
            hetzner("cpx22", 2, 4.0, "x86", false, 0.009),
            hetzner("cx33", 4, 8.0, "x86", false, 0.010),
            hetzner("cx53", 16, 32.0, "x86", false, 0.030),
            hetzner("cax11", 2, 4.0, "arm", false, 0.006),
            hetzner("cax21", 4, 8.0, "arm", false, 0.010),
            hetzner("cax31", 8, 16.0, "arm", false, 0.019),
        ];
        let pick = |size, platform| hetzner_server_type(&types, size, platform, "fsn1").map(|t| t.name.as_str());
        assert_eq!(pick(Size::Small, Platform::LinuxAmd64).unwrap(), "cx23", "deprecated cx22 is skipped");
        assert_eq!(pick(Size::Medium, Platform::LinuxAmd64).unwrap(), "cx33");
        assert_eq!(pick(Size::Large, Platform::LinuxAmd64).unwrap(), "cx53");
        assert_eq!(pick(Size::Small, Platform::LinuxArm64).unwrap(), "cax11");
        assert_eq!(pick(Size::Large, Platform::LinuxArm64).unwrap(), "cax31");
        let err = hetzner_server_type(&types, Size::Small, Platform::LinuxAmd64, "ash").unwrap_err();
        assert!(err.to_string().contains("in ash"), "{err}");
    }
}
