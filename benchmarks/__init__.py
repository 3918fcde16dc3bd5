"""Benchmarks and the GPU lease kit: scripts run from a checkout (a regular package, so that a `benchmarks`
package another distribution installs into site-packages cannot shadow it)."""
