"""Small widgets and renderables shared by the wizard's screens."""
