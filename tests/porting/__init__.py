"""Porting BN parameters between frameworks, checked through the frameworks themselves."""
