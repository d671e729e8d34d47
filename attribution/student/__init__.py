"""The student: a learned embedding distilled from the teacher's rankings."""
