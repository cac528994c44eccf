"""zos_agent."""
