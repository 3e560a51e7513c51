"""LightningDataModules whose default data ships in a registry package or is generated."""
