SELECT petid ,  weight FROM pets WHERE pet_age  >  1
